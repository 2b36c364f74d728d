/* The test guest's virtio-mmio devices: found from the `virtio_mmio.device=` entries of
 * its command line (as Linux finds them), and a virtio-blk driver that reads sectors
 * by polling (virtio 1.x over MMIO, one queue, one request at a time). */
#include "guest.h"

#define MMIO_MAGIC 0x000
#define MMIO_VERSION 0x004
#define MMIO_DEVICE_ID 0x008
#define MMIO_DEVICE_FEATURES 0x010
#define MMIO_DEVICE_FEATURES_SEL 0x014
#define MMIO_DRIVER_FEATURES 0x020
#define MMIO_DRIVER_FEATURES_SEL 0x024
#define MMIO_QUEUE_SEL 0x030
#define MMIO_QUEUE_NUM_MAX 0x034
#define MMIO_QUEUE_NUM 0x038
#define MMIO_QUEUE_READY 0x044
#define MMIO_QUEUE_NOTIFY 0x050
#define MMIO_INTERRUPT_STATUS 0x060
#define MMIO_INTERRUPT_ACK 0x064
#define MMIO_STATUS 0x070
#define MMIO_QUEUE_DESC_LOW 0x080
#define MMIO_QUEUE_DESC_HIGH 0x084
#define MMIO_QUEUE_AVAIL_LOW 0x090
#define MMIO_QUEUE_AVAIL_HIGH 0x094
#define MMIO_QUEUE_USED_LOW 0x0a0
#define MMIO_QUEUE_USED_HIGH 0x0a4

#define STATUS_ACK 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8

static u32 rd(u64 base, u32 off) { return *(volatile u32 *)(base + off); }
static void wr(u64 base, u32 off, u32 v) { *(volatile u32 *)(base + off) = v; }

/* Parses a number in C syntax (0x.. hex or decimal) with an optional K/M suffix. */
static u64 parse_num(const char **p)
{
    const char *s = *p;
    u64 v = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        s += 2;
        for (;; s++) {
            char c = *s;
            if (c >= '0' && c <= '9') v = v * 16 + (u64)(c - '0');
            else if (c >= 'a' && c <= 'f') v = v * 16 + (u64)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') v = v * 16 + (u64)(c - 'A' + 10);
            else break;
        }
    } else {
        while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0');
    }
    if (*s == 'K' || *s == 'k') { v <<= 10; s++; }
    else if (*s == 'M' || *s == 'm') { v <<= 20; s++; }
    *p = s;
    return v;
}

int find_virtio_devices(const char *cmdline, struct mmio_dev *out, int max)
{
    static const char key[] = "virtio_mmio.device=";
    int n = 0;
    for (const char *p = cmdline; *p && n < max; p++) {
        int i = 0;
        while (key[i] && p[i] == key[i]) i++;
        if (key[i]) continue;
        const char *s = p + i;
        u64 size = parse_num(&s);
        if (*s++ != '@') continue;
        u64 base = parse_num(&s);
        if (*s++ != ':') continue;
        u64 irq = parse_num(&s);
        if (size == 0 || rd(base, MMIO_MAGIC) != 0x74726976) continue;
        out[n].base = base;
        out[n].irq = (u32)irq;
        out[n].version = rd(base, MMIO_VERSION);
        out[n].device_id = rd(base, MMIO_DEVICE_ID);
        n++;
        p = s - 1;
    }
    return n;
}

static struct desc descs[QSIZE] __attribute__((aligned(16)));
static struct avail avail_ring __attribute__((aligned(2)));
static struct used used_ring __attribute__((aligned(4096)));
static struct { u32 type; u32 reserved; u64 sector; } req;
static volatile u8 req_status;

int mmio_start(const struct mmio_dev *d, u32 device_id)
{
    u64 b = d->base;
    if (d->version != 2 || d->device_id != device_id) return -1;
    wr(b, MMIO_STATUS, 0);
    wr(b, MMIO_STATUS, STATUS_ACK);
    wr(b, MMIO_STATUS, STATUS_ACK | STATUS_DRIVER);
    /* Only VIRTIO_F_VERSION_1 (bit 32): no other feature is needed. */
    wr(b, MMIO_DRIVER_FEATURES_SEL, 0);
    wr(b, MMIO_DRIVER_FEATURES, 0);
    wr(b, MMIO_DRIVER_FEATURES_SEL, 1);
    wr(b, MMIO_DRIVER_FEATURES, 1);
    wr(b, MMIO_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(rd(b, MMIO_STATUS) & STATUS_FEATURES_OK)) return -2;
    return 0;
}

int mmio_queue(const struct mmio_dev *d, u32 q, struct desc *desc, struct avail *a,
               struct used *u, u32 size)
{
    u64 b = d->base;
    wr(b, MMIO_QUEUE_SEL, q);
    if (rd(b, MMIO_QUEUE_NUM_MAX) < size) return -3;
    wr(b, MMIO_QUEUE_NUM, size);
    wr(b, MMIO_QUEUE_DESC_LOW, (u32)(u64)desc);
    wr(b, MMIO_QUEUE_DESC_HIGH, (u32)((u64)desc >> 32));
    wr(b, MMIO_QUEUE_AVAIL_LOW, (u32)(u64)a);
    wr(b, MMIO_QUEUE_AVAIL_HIGH, (u32)((u64)a >> 32));
    wr(b, MMIO_QUEUE_USED_LOW, (u32)(u64)u);
    wr(b, MMIO_QUEUE_USED_HIGH, (u32)((u64)u >> 32));
    wr(b, MMIO_QUEUE_READY, 1);
    return 0;
}

void mmio_ready(const struct mmio_dev *d)
{
    wr(d->base, MMIO_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
}

void mmio_notify(const struct mmio_dev *d, u32 q)
{
    wr(d->base, MMIO_QUEUE_NOTIFY, q);
}

u64 mmio_config64(const struct mmio_dev *d, u32 off)
{
    return (u64)rd(d->base, 0x100 + off) | ((u64)rd(d->base, 0x100 + off + 4) << 32);
}

int blk_init(const struct mmio_dev *d)
{
    int r = mmio_start(d, 2);
    if (r) return r;
    r = mmio_queue(d, 0, descs, &avail_ring, &used_ring, QSIZE);
    if (r) return r;
    mmio_ready(d);
    return 0;
}

int blk_read(const struct mmio_dev *d, u64 sector, u8 *buf)
{
    req.type = 0; /* VIRTIO_BLK_T_IN */
    req.reserved = 0;
    req.sector = sector;
    req_status = 0xff;
    descs[0] = (struct desc){(u64)&req, sizeof(req), 1 /* NEXT */, 1};
    descs[1] = (struct desc){(u64)buf, 512, 1 | 2 /* NEXT, WRITE */, 2};
    descs[2] = (struct desc){(u64)&req_status, 1, 2 /* WRITE */, 0};
    u16 seen = used_ring.idx;
    avail_ring.ring[avail_ring.idx % QSIZE] = 0;
    __asm__ volatile("" ::: "memory");
    avail_ring.idx++;
    __asm__ volatile("mfence" ::: "memory");
    u32 irqs = irq_count();
    mmio_notify(d, 0);
    /* With interrupts, each request must raise one before its completion is read. */
    if (use_irq)
        irq_wait(irqs);
    while (*(volatile u16 *)&used_ring.idx == seen)
        ;
    if (!use_irq)
        wr(d->base, MMIO_INTERRUPT_ACK, rd(d->base, MMIO_INTERRUPT_STATUS));
    return req_status == 0 ? 0 : -1;
}
