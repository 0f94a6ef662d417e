/* The restore stub: a static, libc-free program that hpccr execs in a new task with the exact pid
 * of the process being restored.  It never runs on its own: the tracer stops it at the exec, uses
 * the `syscall; int3` pair at its entry point to inject the first system calls, then replaces its
 * whole address space with the saved one. */
	.text
	.globl _start
_start:
	syscall
	int3
	/* Not reached while traced; exit(127) if somebody runs the stub by hand. */
	mov	$60, %eax
	mov	$127, %edi
	syscall
	.section .note.GNU-stack,"",@progbits
