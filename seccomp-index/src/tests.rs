// Test helpers outside #[test] functions unwrap too: a failure is the test's.
#![allow(clippy::unwrap_used)]

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition};

use super::*;

/// i386's audit architecture: another architecture's numbers.
const AUDIT_ARCH_I386: u32 = 3 | 0x4000_0000;
const X32: u32 = X32_SYSCALL_BIT;
/// BPF_JMP | BPF_JA: seccompiler's rules use it past long conditions.
const JUMP: u16 = 0x05;

/// Runs `program` as the kernel would on a system call `number` of `arch`
/// with `args`: its answer and how many instructions it ran. Knows the
/// instructions seccompiler and this crate emit.
fn run(program: &[sock_filter], number: u32, arch: u32, args: [u64; 6]) -> (u32, usize) {
    let word = |at: u32| -> u32 {
        match at {
            NUMBER_AT => number,
            ARCH_AT => arch,
            16..=63 => {
                let arg = args[(at as usize - 16) / 8];
                if (at - 16) % 8 == 4 {
                    (arg >> 32) as u32
                } else {
                    arg as u32
                }
            }
            other => panic!("a load from {other}"),
        }
    };
    let (mut accumulator, mut at, mut steps) = (0u32, 0usize, 0usize);
    loop {
        let insn = &program[at];
        steps += 1;
        at += 1;
        let jump = |taken: bool| usize::from(if taken { insn.jt } else { insn.jf });
        match insn.code {
            LOAD_WORD => accumulator = word(insn.k),
            0x54 => accumulator &= insn.k, // BPF_ALU | BPF_AND | BPF_K
            JUMP => at += insn.k as usize,
            JUMP_IF_EQUAL => at += jump(accumulator == insn.k),
            0x25 => at += jump(accumulator > insn.k), // BPF_JMP | BPF_JGT | BPF_K
            JUMP_IF_AT_LEAST => at += jump(accumulator >= insn.k),
            RETURN => return (insn.k, steps),
            other => panic!("opcode {other:#x} at {}", at - 1),
        }
    }
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).unwrap()
}

/// A deny list shaped like the jail's: calls denied outright, clone
/// denied when any of some flags is set, setns unless its type is a
/// network namespace.
fn deny_list() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_init_module,
        libc::SYS_kexec_load,
        libc::SYS_reboot,
        libc::SYS_mount,
        libc::SYS_unshare,
        libc::SYS_io_uring_setup,
        libc::SYS_open_by_handle_at,
    ]
    .into_iter()
    .map(|call| (call, Vec::new()))
    .collect();
    let flags = [libc::CLONE_NEWUSER, libc::CLONE_NEWNS, libc::CLONE_NEWPID].map(|flag| {
        let flag = flag as u64;
        rule(vec![SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag).unwrap()])
    });
    rules.insert(libc::SYS_clone, flags.to_vec());
    let not_network =
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, libc::CLONE_NEWNET as u64).unwrap();
    rules.insert(libc::SYS_setns, vec![rule(vec![not_network])]);
    rules
}

/// An allow list shaped like the vmm's: plain calls, mmap without
/// PROT_EXEC, ioctl with two requests.
fn allow_list() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_futex,
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_getpid,
        libc::SYS_tgkill,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_poll,
        libc::SYS_epoll_wait,
    ]
    .into_iter()
    .map(|call| (call, Vec::new()))
    .collect();
    let exec = libc::PROT_EXEC as u64;
    let no_exec = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(exec), 0).unwrap();
    rules.insert(libc::SYS_mmap, vec![rule(vec![no_exec])]);
    let request =
        |value| rule(vec![SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value).unwrap()]);
    rules.insert(libc::SYS_ioctl, vec![request(0xae80), request(0x8090_ae81)]);
    rules
}

/// Argument sets that take each rule above both ways.
fn argument_sets() -> Vec<[u64; 6]> {
    let mut sets = vec![[0; 6], [u64::MAX; 6]];
    for value in [
        libc::CLONE_NEWUSER as u64,
        libc::CLONE_NEWNET as u64,
        (libc::CLONE_NEWNS | libc::CLONE_FS) as u64,
        libc::PROT_EXEC as u64,
        (libc::PROT_READ | libc::PROT_WRITE) as u64,
        0xae80,
        0x8090_ae81,
        0xffff_ffff_8090_ae81,
    ] {
        for position in 0..3 {
            let mut set = [0; 6];
            set[position] = value;
            sets.push(set);
        }
    }
    sets
}

/// Every number the kernel could see: x86-64's and past them, x32's,
/// the top of the range.
fn numbers() -> impl Iterator<Item = u32> {
    (0..600).chain(X32..X32 + 600).chain([X32 - 1, u32::MAX - 1, u32::MAX])
}

/// Checks that `compile` answers exactly as seccompiler's own program for
/// every number, architecture and argument set, but where `early` answers.
fn answers_as_seccompiler(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    otherwise: SeccompAction,
    matched: SeccompAction,
    early: &[Early],
) {
    let plain: BpfProgram = SeccompFilter::new(rules.clone(), otherwise.clone(), matched.clone(), TargetArch::x86_64)
        .unwrap()
        .try_into()
        .unwrap();
    let indexed = compile(rules, otherwise, matched, early).unwrap();
    let sets = argument_sets();
    for number in numbers() {
        for arch in [AUDIT_ARCH_X86_64, AUDIT_ARCH_I386] {
            let answered_early = early.iter().find_map(|early| match early {
                Early::From(first, action) if number >= *first => Some(u32::from(action.clone())),
                Early::Call(call, action) if i64::from(number) == *call => Some(u32::from(action.clone())),
                _ => None,
            });
            for args in &sets {
                let expected = match answered_early {
                    Some(answer) if arch == AUDIT_ARCH_X86_64 => answer,
                    _ => run(&plain, number, arch, *args).0,
                };
                assert_eq!(
                    run(&indexed, number, arch, *args).0,
                    expected,
                    "call {number:#x}, arch {arch:#x}, {args:x?}"
                );
            }
        }
    }
}

#[test]
fn a_deny_list_behind_the_index_answers_every_call_as_seccompilers_own() {
    let eperm = || SeccompAction::Errno(libc::EPERM as u32);
    answers_as_seccompiler(deny_list(), SeccompAction::Allow, eperm(), &[]);
    answers_as_seccompiler(
        deny_list(),
        SeccompAction::Allow,
        eperm(),
        &[Early::From(X32, eperm()), Early::Call(libc::SYS_clone3, SeccompAction::Errno(libc::ENOSYS as u32))],
    );
}

#[test]
fn an_allow_list_behind_the_index_answers_every_call_as_seccompilers_own() {
    answers_as_seccompiler(allow_list(), SeccompAction::KillProcess, SeccompAction::Allow, &[]);
    answers_as_seccompiler(BTreeMap::new(), SeccompAction::KillProcess, SeccompAction::Allow, &[]);
    let one = [(libc::SYS_read, Vec::new())].into_iter().collect();
    answers_as_seccompiler(one, SeccompAction::KillProcess, SeccompAction::Allow, &[]);
}

#[test]
fn a_call_the_list_does_not_name_is_answered_in_a_handful_of_steps() {
    // 30 listed calls: a chain walks 60 instructions past them all; the
    // index, about log2(30) comparisons.
    let rules: BTreeMap<i64, Vec<SeccompRule>> = (100..130).map(|call| (call, Vec::new())).collect();
    let indexed = compile(rules, SeccompAction::Allow, SeccompAction::Errno(1), &[]).unwrap();
    let longest = (0..600)
        .filter(|number| !(100..130).contains(number))
        .map(|number| run(&indexed, number, AUDIT_ARCH_X86_64, [0; 6]).1)
        .max()
        .unwrap();
    // The architecture (2), the number (1), five levels, a last test and
    // its return.
    assert!(longest <= 10, "an unlisted call ran {longest} instructions");
}

#[test]
fn numbers_that_are_not_system_calls_are_refused() {
    let rules = [(-1, Vec::new())].into_iter().collect();
    assert!(matches!(compile(rules, SeccompAction::Allow, SeccompAction::Errno(1), &[]), Err(IndexError::Number(-1))));
    let early = [Early::Call(1 << 40, SeccompAction::Allow)];
    assert!(matches!(
        compile(BTreeMap::new(), SeccompAction::Allow, SeccompAction::Errno(1), &early),
        Err(IndexError::Number(_))
    ));
}

#[test]
fn the_kernel_takes_the_program_and_answers_by_it() {
    let rules = [(libc::SYS_getppid, Vec::new())].into_iter().collect();
    let eperm = SeccompAction::Errno(libc::EPERM as u32);
    let program = compile(rules, SeccompAction::Allow, eperm.clone(), &[Early::From(X32, eperm)]).unwrap();
    let errno =
        |value: libc::c_long| if value < 0 { std::io::Error::last_os_error().raw_os_error().unwrap() } else { 0 };
    // seccompiler's apply_filter binds the calling thread only.
    let (ppid, pid, x32) = std::thread::spawn(move || {
        seccompiler::apply_filter(&program).unwrap();
        // SAFETY: getppid(2) and getpid(2) have no arguments and no
        // effect; the x32 number of getpid likewise (ENOSYS without x32).
        unsafe {
            (
                errno(libc::syscall(libc::SYS_getppid)),
                errno(libc::syscall(libc::SYS_getpid)),
                errno(libc::syscall(libc::c_long::from(X32) | libc::SYS_getpid)),
            )
        }
    })
    .join()
    .unwrap();
    assert_eq!((ppid, pid, x32), (libc::EPERM, 0, libc::EPERM));
}
