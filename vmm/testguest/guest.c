/* joey's test guest, in C: prints to the 8250 serial port and names what its
 * command line (from the PVH start_info) says, then resets. */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

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

void guest_main(const struct start_info *si)
{
    puts_serial("joey-test-guest: started\n");
    if (si->magic == 0x336ec578 && si->cmdline_paddr) {
        puts_serial("joey-test-guest: cmdline ");
        puts_serial((const char *)si->cmdline_paddr);
        puts_serial("\n");
    }
    puts_serial("joey-test-guest: exit 0\n");
    guest_reset();
}
