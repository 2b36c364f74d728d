/* joey's test guest: the PVH entry (32-bit protected mode, paging off, %ebx = the
 * start_info's address), a switch to long mode over identity-mapped 2 MiB pages of
 * the first 4 GiB (virtio-mmio devices sit just below 4 GiB), then
 * guest_main(start_info) in C. */
        .section .note.pvh, "a"
        .balign 4
        .long 4                 /* name size: "Xen\0" */
        .long 4                 /* descriptor size */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long pvh_entry

        .section .text.entry, "ax"
        .code32
        .globl pvh_entry
pvh_entry:
        cli
        mov     %ebx, %edi              /* start_info, guest_main's argument */
        /* PML4[0] -> PDPT, PDPT[0..3] -> 4 PDs, 2048 x 2 MiB pages. */
        mov     $pdpt, %eax
        or      $0x3, %eax
        mov     %eax, pml4
        xor     %ecx, %ecx
1:      mov     %ecx, %eax
        shl     $12, %eax
        add     $pd, %eax
        or      $0x3, %eax
        mov     %eax, pdpt(,%ecx,8)
        inc     %ecx
        cmp     $4, %ecx
        jne     1b
        xor     %ecx, %ecx
2:      mov     %ecx, %eax
        shl     $21, %eax
        or      $0x83, %eax             /* present, writable, 2 MiB */
        mov     %eax, pd(,%ecx,8)
        inc     %ecx
        cmp     $2048, %ecx
        jne     2b
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     %cr4, %eax
        or      $0x20, %eax             /* PAE */
        mov     %eax, %cr4
        mov     $0xC0000080, %ecx       /* EFER */
        rdmsr
        or      $0x100, %eax            /* LME */
        wrmsr
        mov     %cr0, %eax
        or      $0x80000001, %eax       /* PG, PE */
        mov     %eax, %cr0
        lgdt    gdt_ptr
        ljmp    $0x08, $long_mode

        .code64
long_mode:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $stack_top, %rsp
        call    guest_main
        /* guest_main does not return; if it does, reset. */
        .globl guest_reset
guest_reset:
        /* The i8042's reset line (joey-vmm ends there); without an i8042 (QEMU's
         * microvm), fault the CPU into a reset. */
        mov     $0xfe, %al
        out     %al, $0x64
        lidt    no_idt
        int3
        hlt

        .section .rodata
        .balign 8
gdt:
        .quad   0
        .quad   0x00af9a000000ffff      /* 0x08: 64-bit code */
        .quad   0x00cf92000000ffff      /* 0x10: data */
gdt_ptr:
        .word   gdt_ptr - gdt - 1
        .long   gdt
no_idt:
        .word   0
        .quad   0

        .section .bss
        .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4 * 4096
stack:  .skip 16384
stack_top:

        .section .note.GNU-stack, "", @progbits
