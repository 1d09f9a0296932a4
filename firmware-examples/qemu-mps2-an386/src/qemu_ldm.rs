//! QEMU-only: emulate the one instruction of `p256-cm4` that QEMU rejects.
//!
//! `p256-cm4`'s `mul288x288` (mod-n multiplication: ECDSA sign and verify) contains
//! `ldm r4, {r6}`, which LLVM encodes as LDM.W with a single register. ARMv7-M calls that
//! encoding UNPREDICTABLE; Cortex-M4 silicon executes it as `ldr r6, [r4]` (the crate's figures
//! come from an STM32WLE5), QEMU 7.2 raises UNDEFINSTR. This UsageFault handler recognises
//! exactly that instruction, performs the load, and resumes after it; any other fault ends the
//! program as before. A board build does not need it.

use core::arch::global_asm;

/// Routes UNDEFINSTR to the UsageFault handler below instead of escalating to HardFault.
pub(crate) fn enable(scb: &mut cortex_m::peripheral::SCB) {
    scb.enable(cortex_m::peripheral::scb::Exception::UsageFault);
}

global_asm!(
    ".section .text.UsageFault,\"ax\",%progbits",
    ".global UsageFault",
    ".type UsageFault,%function",
    ".thumb_func",
    "UsageFault:",
    // The stacked frame: MSP or PSP per EXC_RETURN bit 2.
    "    tst lr, #4",
    "    ite eq",
    "    mrseq r0, msp",
    "    mrsne r0, psp",
    "    ldr r1, [r0, #24]", // stacked PC
    "    ldrh r2, [r1]",
    "    ldrh r3, [r1, #2]",
    "    movw r12, #0xe894", // LDM.W r4, ...
    "    cmp r2, r12",
    "    bne 1f",
    "    cmp r3, #0x40", // ... {r6}
    "    bne 1f",
    "    ldr r6, [r4]",
    "    adds r1, #4",
    "    str r1, [r0, #24]",
    "    ldr r2, =0xE000ED28", // CFSR: clear UNDEFINSTR (write one)
    "    mov r3, #0x10000",
    "    str r3, [r2]",
    "    bx lr",
    "1:  b HardFault",
    ".ltorg",
    ".size UsageFault, . - UsageFault",
);
