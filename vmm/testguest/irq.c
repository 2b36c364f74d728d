/* The test guest's interrupts: an IDT with one handler, the local APIC enabled, the
 * legacy PIC masked, and a device's I/O APIC pin routed to the handler's vector. The
 * handler acknowledges the device (virtio-mmio interrupt status) and the local APIC,
 * and counts. Waiting for an interrupt is `sti; hlt`, so a device that never raises
 * its line hangs the guest, and the test's deadline catches it. Also: the MP table's
 * processor count (the Intel MP spec's floating pointer in the last KiB of base
 * memory). */
#include "guest.h"

#define VECTOR 0x30
#define LAPIC 0xfee00000ull
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_TPR 0x80
#define IOAPIC 0xfec00000ull

struct gate { u16 off_lo, sel; u8 ist, attr; u16 off_mid; u32 off_hi, zero; } __attribute__((packed));
static struct gate idt[256] __attribute__((aligned(16)));
static struct { u16 limit; u64 base; } __attribute__((packed)) idtr;

static volatile u32 count;
static u64 dev_base;

struct interrupt_frame;

static void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static u32 rd32(u64 a) { return *(volatile u32 *)a; }
static void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }

__attribute__((interrupt)) static void on_device(struct interrupt_frame *f)
{
    (void)f;
    wr32(dev_base + 0x064, rd32(dev_base + 0x060)); /* InterruptACK */
    count++;
    wr32(LAPIC + LAPIC_EOI, 0);
}

__attribute__((interrupt)) static void on_spurious(struct interrupt_frame *f) { (void)f; }

static void set_gate(int v, void (*h)(struct interrupt_frame *))
{
    u64 a = (u64)h;
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    idt[v] = (struct gate){(u16)a, cs, 0, 0x8e, (u16)(a >> 16), (u32)(a >> 32), 0};
}

void irq_init(const struct mmio_dev *d)
{
    dev_base = d->base;
    set_gate(VECTOR, on_device);
    set_gate(0xff, on_spurious);
    idtr.limit = sizeof(idt) - 1;
    idtr.base = (u64)idt;
    __asm__ volatile("lidt %0" : : "m"(idtr));
    outb(0x21, 0xff); /* both PICs masked */
    outb(0xa1, 0xff);
    wr32(LAPIC + LAPIC_TPR, 0);
    wr32(LAPIC + LAPIC_SVR, 0x100 | 0xff);
    /* Redirection entry: fixed delivery to APIC 0, edge, active high, unmasked. */
    wr32(IOAPIC, 0x10 + 2 * d->irq + 1);
    wr32(IOAPIC + 0x10, 0);
    wr32(IOAPIC, 0x10 + 2 * d->irq);
    wr32(IOAPIC + 0x10, VECTOR);
}

u32 irq_count(void) { return count; }

void irq_wait(u32 seen)
{
    for (;;) {
        __asm__ volatile("cli" ::: "memory");
        if (count != seen)
            break;
        __asm__ volatile("sti; hlt" ::: "memory");
    }
    __asm__ volatile("cli" ::: "memory");
}

int mptable_cpus(void)
{
    for (u64 p = 0x9fc00; p < 0xa0000; p += 16) {
        const u8 *m = (const u8 *)p;
        if (m[0] != '_' || m[1] != 'M' || m[2] != 'P' || m[3] != '_')
            continue;
        u8 sum = 0;
        for (int i = 0; i < 16; i++) sum += m[i];
        if (sum) return -1;
        const u8 *t = (const u8 *)(u64)*(const u32 *)(m + 4);
        u16 len = *(const u16 *)(t + 4), entries = *(const u16 *)(t + 34);
        sum = 0;
        for (u16 i = 0; i < len; i++) sum += t[i];
        if (sum || t[0] != 'P' || t[1] != 'C' || t[2] != 'M' || t[3] != 'P') return -2;
        int cpus = 0;
        const u8 *e = t + 44;
        for (u16 i = 0; i < entries && e < t + len; i++) {
            if (e[0] == 0) { cpus += e[3] & 1; e += 20; }
            else e += 8;
        }
        return cpus;
    }
    return 0;
}
