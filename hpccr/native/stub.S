/* The restore stub: a static, libc-free program that hpccr execs in every task it recreates,
 * with the task's saved pid.  It only waits in pause() until hpccr seizes it with ptrace; hpccr
 * then injects system calls through the `syscall; int3` pair at `inject` (9 bytes after the
 * entry point) and replaces the whole address space with the saved one.  Run by hand, it just
 * waits for a signal. */
	.text
	.globl _start
_start:
	mov	$34, %eax	/* pause */
	syscall
	jmp	_start
inject:
	syscall
	int3
	.section .note.GNU-stack,"",@progbits
