/* joey's test guest, in C: prints to the 8250 serial port, echoes its command line
 * (from the PVH start_info) and its module's checksum (the initrd), names its
 * virtio-mmio devices and the MP table's vCPUs, reads sectors of its virtio-blk disk
 * and prints their checksum (waiting for each completion's interrupt with joey.irq=1),
 * echoes a message over vsock (joey.vsock_port=P), prints its exit line (joey.exit=N)
 * and resets. */
#include "guest.h"

struct start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};

void guest_reset(void);

static void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void putc_serial(char c)
{
    while (!(inb(0x3f8 + 5) & 0x20))
        ;
    outb(0x3f8, (u8)c);
}

static void puts_serial(const char *s)
{
    while (*s)
        putc_serial(*s++);
}

static void put_hex(u64 v)
{
    puts_serial("0x");
    for (int i = 60; i >= 0; i -= 4)
        putc_serial("0123456789abcdef"[(v >> i) & 0xf]);
}

static void put_dec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts_serial(buf + i);
}

/* The value of `key=` on the command line, or `dflt`. */
static u64 cmdline_num(const char *cmdline, const char *key, u64 dflt)
{
    for (const char *p = cmdline; *p; p++) {
        int i = 0;
        while (key[i] && p[i] == key[i]) i++;
        if (key[i] || (p != cmdline && p[-1] != ' ')) continue;
        u64 v = 0;
        for (p += i; *p >= '0' && *p <= '9'; p++) v = v * 10 + (u64)(*p - '0');
        return v;
    }
    return dflt;
}

static u8 sector[512];
int use_irq;

void guest_main(const struct start_info *si)
{
    puts_serial("joey-test-guest: started\n");
    const char *cmdline = "";
    if (si->magic == 0x336ec578 && si->cmdline_paddr)
        cmdline = (const char *)si->cmdline_paddr;
    puts_serial("joey-test-guest: cmdline ");
    puts_serial(cmdline);
    puts_serial("\n");
    /* The first module (the initrd): its size and FNV-1a. */
    if (si->magic == 0x336ec578 && si->nr_modules && si->modlist_paddr) {
        const u64 *m = (const u64 *)si->modlist_paddr;
        const u8 *p = (const u8 *)m[0];
        u64 h = 0xcbf29ce484222325ull;
        for (u64 i = 0; i < m[1]; i++)
            h = (h ^ p[i]) * 0x100000001b3ull;
        puts_serial("joey-test-guest: module ");
        put_dec(m[1]);
        puts_serial(" bytes fnv1a ");
        put_hex(h);
        puts_serial("\n");
    }
    struct mmio_dev devs[8];
    int n = find_virtio_devices(cmdline, devs, 8);
    for (int i = 0; i < n; i++) {
        puts_serial("joey-test-guest: virtio-mmio ");
        put_hex(devs[i].base);
        puts_serial(" device ");
        put_dec(devs[i].device_id);
        puts_serial("\n");
    }
    int cpus = mptable_cpus();
    if (cpus) {
        puts_serial("joey-test-guest: mptable cpus ");
        put_dec((u64)cpus);
        puts_serial("\n");
    }
    use_irq = cmdline_num(cmdline, "joey.irq=", 0) == 1;
    u64 sectors = cmdline_num(cmdline, "joey.sectors=", 8);
    for (int i = 0; i < n; i++) {
        if (devs[i].device_id != 2)
            continue;
        int r = blk_init(&devs[i]);
        if (r) {
            puts_serial("joey-test-guest: virtio-blk init failed at step ");
            put_dec((u64)-r);
            puts_serial("\n");
            break;
        }
        if (use_irq)
            irq_init(&devs[i]);
        /* FNV-1a, 64 bits, over the sectors in order. */
        u64 h = 0xcbf29ce484222325ull;
        for (u64 s = 0; s < sectors; s++) {
            if (blk_read(&devs[i], s, sector)) {
                puts_serial("joey-test-guest: virtio-blk read failed\n");
                break;
            }
            for (int j = 0; j < 512; j++)
                h = (h ^ sector[j]) * 0x100000001b3ull;
        }
        puts_serial("joey-test-guest: blk sectors ");
        put_dec(sectors);
        puts_serial(" fnv1a ");
        put_hex(h);
        puts_serial("\n");
        if (use_irq) {
            puts_serial("joey-test-guest: blk interrupts ");
            put_dec(irq_count());
            puts_serial("\n");
        }
        break;
    }
    u64 port = cmdline_num(cmdline, "joey.vsock_port=", 0);
    for (int i = 0; port && i < n; i++) {
        if (devs[i].device_id != 19)
            continue;
        int r = vsock_init(&devs[i]);
        static char reply[256];
        if (!r)
            r = vsock_echo(&devs[i], (u32)port, "ping from the test guest", reply, sizeof(reply));
        if (r) {
            puts_serial("joey-test-guest: vsock failed at step ");
            put_dec((u64)-r);
            puts_serial("\n");
            break;
        }
        puts_serial("joey-test-guest: vsock echo ");
        puts_serial(reply);
        puts_serial("\n");
        break;
    }
    /* The exit status to name, `joey.exit=N` (0 by default). */
    puts_serial("joey-test-guest: exit ");
    put_dec(cmdline_num(cmdline, "joey.exit=", 0));
    puts_serial("\n");
    guest_reset();
}
