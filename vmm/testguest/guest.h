/* joey's test guest: what its C files share. */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* A virtio-mmio device from the command line. */
struct mmio_dev {
    u64 base;
    u32 irq, version, device_id;
};

/* Split virtqueues of QSIZE entries. */
#define QSIZE 8
struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[QSIZE]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[QSIZE]; u16 avail_event; };

/* The virtio-mmio transport (virtio.c). */
int mmio_start(const struct mmio_dev *d, u32 device_id);
int mmio_queue(const struct mmio_dev *d, u32 q, struct desc *desc, struct avail *a,
               struct used *u, u32 size);
void mmio_ready(const struct mmio_dev *d);
void mmio_notify(const struct mmio_dev *d, u32 q);
u64 mmio_config64(const struct mmio_dev *d, u32 off);

int find_virtio_devices(const char *cmdline, struct mmio_dev *out, int max);
int blk_init(const struct mmio_dev *d);
int blk_read(const struct mmio_dev *d, u64 sector, u8 *buf);
int vsock_init(const struct mmio_dev *d);
int vsock_echo(const struct mmio_dev *d, u32 port, const char *msg, char *reply, u32 cap);
/* Interrupts and the MP table (irq.c). */
void irq_init(const struct mmio_dev *d);
u32 irq_count(void);
void irq_wait(u32 seen);
int mptable_cpus(void);
/* Set by guest.c from `joey.irq=1`: wait for interrupts rather than poll. */
extern int use_irq;
