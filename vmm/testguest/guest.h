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

int find_virtio_devices(const char *cmdline, struct mmio_dev *out, int max);
int blk_init(const struct mmio_dev *d);
int blk_read(const struct mmio_dev *d, u64 sector, u8 *buf);
