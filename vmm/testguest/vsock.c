/* The test guest's virtio-vsock driver: connects a stream to a host port, sends a
 * message, and returns what the host sends back (virtio 1.x over MMIO, polled; rx,
 * tx and event queues; credit is a fixed buffer the guest advertises). */
#include "guest.h"

#define BUF 4096
/* Polling iterations between repeated kicks. */
#define REKICK 200000

enum { OP_REQUEST = 1, OP_RESPONSE = 2, OP_RST = 3, OP_SHUTDOWN = 4, OP_RW = 5 };

struct hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

struct vq {
    struct desc d[QSIZE] __attribute__((aligned(16)));
    struct avail a __attribute__((aligned(2)));
    struct used u __attribute__((aligned(4096)));
    u16 seen;
};

static struct vq rxq __attribute__((aligned(4096)));
static struct vq txq __attribute__((aligned(4096)));
static struct vq evq __attribute__((aligned(4096)));
static u8 rx_bufs[QSIZE][sizeof(struct hdr) + BUF];
static struct hdr tx_hdr;
static u8 tx_data[BUF];
static u8 ev_buf[8];
static u64 guest_cid;
static u32 fwd_cnt;

static void post_rx(const struct mmio_dev *d, u16 i)
{
    rxq.d[i] = (struct desc){(u64)rx_bufs[i], sizeof(rx_bufs[i]), 2 /* WRITE */, 0};
    rxq.a.ring[rxq.a.idx % QSIZE] = i;
    __asm__ volatile("mfence" ::: "memory");
    rxq.a.idx++;
    mmio_notify(d, 0);
}

int vsock_init(const struct mmio_dev *d)
{
    struct vq *qs[3] = {&rxq, &txq, &evq};
    int r = mmio_start(d, 19);
    if (r)
        return r;
    for (u32 q = 0; q < 3; q++)
        if (mmio_queue(d, q, qs[q]->d, &qs[q]->a, &qs[q]->u, QSIZE))
            return -10 - (int)q;
    mmio_ready(d);
    guest_cid = mmio_config64(d, 0);
    for (u16 i = 0; i < QSIZE; i++)
        post_rx(d, i);
    evq.d[0] = (struct desc){(u64)ev_buf, sizeof(ev_buf), 2, 0};
    evq.a.ring[0] = 0;
    __asm__ volatile("mfence" ::: "memory");
    evq.a.idx = 1;
    mmio_notify(d, 2);
    return 0;
}

static void send(const struct mmio_dev *d, u32 port, u16 op, const u8 *data, u32 len)
{
    /* A SHUTDOWN shuts both directions (flags RCV | SEND). */
    u32 flags = op == OP_SHUTDOWN ? 3 : 0;
    tx_hdr = (struct hdr){guest_cid, 2, 1234, port, len, 1 /* STREAM */, op, flags, BUF, fwd_cnt};
    for (u32 i = 0; i < len; i++)
        tx_data[i] = data[i];
    txq.d[0] = (struct desc){(u64)&tx_hdr, sizeof(tx_hdr), len ? 1 : 0, 1};
    txq.d[1] = (struct desc){(u64)tx_data, len, 0, 0};
    txq.a.ring[txq.a.idx % QSIZE] = 0;
    __asm__ volatile("mfence" ::: "memory");
    txq.a.idx++;
    mmio_notify(d, 1);
    for (u32 spins = 1; *(volatile u16 *)&txq.u.idx == txq.seen; spins++)
        if (spins % REKICK == 0)
            mmio_notify(d, 1);
    txq.seen++;
}

/* The next packet the host sends; its header is `*h`, its payload the returned bytes. */
static const u8 *receive(const struct mmio_dev *d, struct hdr *h)
{
    for (u32 spins = 1; *(volatile u16 *)&rxq.u.idx == rxq.seen; spins++)
        if (spins % REKICK == 0) {
            /* A polling driver kicks again now and then: a kick that reaches a
             * vhost-user backend before QEMU has enabled its rings is dropped. */
            mmio_notify(d, 0);
            mmio_notify(d, 1);
        }
    u16 id = (u16)rxq.u.ring[rxq.seen % QSIZE].id;
    rxq.seen++;
    const u8 *buf = rx_bufs[id];
    *h = *(const struct hdr *)buf;
    static u8 copy[BUF];
    for (u32 i = 0; i < h->len && i < BUF; i++)
        copy[i] = buf[sizeof(struct hdr) + i];
    fwd_cnt += h->len;
    post_rx(d, id);
    return copy;
}

int vsock_echo(const struct mmio_dev *d, u32 port, const char *msg, char *reply, u32 cap)
{
    struct hdr h;
    send(d, port, OP_REQUEST, 0, 0);
    receive(d, &h);
    if (h.op != OP_RESPONSE)
        return -1;
    u32 len = 0;
    while (msg[len])
        len++;
    send(d, port, OP_RW, (const u8 *)msg, len);
    u32 got = 0;
    while (got < len) {
        const u8 *p = receive(d, &h);
        if (h.op == OP_RST || h.op == OP_SHUTDOWN)
            return -2;
        if (h.op != OP_RW)
            continue;
        for (u32 i = 0; i < h.len && got + 1 < cap; i++)
            reply[got++] = (char)p[i];
    }
    reply[got] = 0;
    send(d, port, OP_SHUTDOWN, 0, 0);
    return 0;
}
