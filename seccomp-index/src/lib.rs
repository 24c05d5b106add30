//! x86-64 seccomp programs that find a system call's rules by binary
//! search over the listed numbers, where seccompiler walks a chain.
//!
//! Why: seccompiler compiles a filter as one chain, two instructions per
//! listed call, so a call it does not list runs past every comparison.
//! When the kernel attaches a filter it runs it once per system call
//! number (about 460 on x86-64) to cache the calls it always allows
//! (`seccomp_cache_prepare`), and JIT-compiles it. Every cold restart of a
//! driver VM attaches three such filters (the jail's, then the vmm's main
//! and vCPU threads'); in a tree, each number takes a handful of
//! comparisons. Installing each, p50 over 300 in a thread, three rounds:
//! the jail's 37-38 us against 104-107 as the three filters it was, the
//! vmm's vCPU thread's 36 against 73-97, its main thread's 36-53 against
//! 71-89.
//!
//! Before the tree it answers what a list of x86-64 numbers cannot say
//! ([`Early`]): a range (x32's numbers, which share x86-64's audit
//! architecture) and single calls answered outright (clone3 with ENOSYS
//! where clone is filtered by its flags).
//!
//! What it is not: a seccomp compiler of its own. The code of each rule
//! (the argument comparisons) is seccompiler's, and the program answers
//! every call as seccompiler's program of the same rules does; only the
//! way to a call's rules changes. [`verify::against_seccompiler`] runs
//! both in an interpreter over every listed call and its neighbours, the
//! first 1,024 numbers of x86-64 and x32 and the range's edges, six
//! architecture values and arguments that take every path through each
//! call's rules: this crate's tests with rules of their own, and the
//! tests of the jail's and the vmm's filters with their real ones. It is
//! also shorter: the jail's 186 instructions against 224 in its three
//! filters before.

use std::collections::BTreeMap;

use seccompiler::{sock_filter, BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

pub mod verify;

/// `struct seccomp_data`: where the system call number and the audit
/// architecture are.
const NUMBER_AT: u32 = 0;
const ARCH_AT: u32 = 4;
/// The most instructions the kernel takes in one program (BPF_MAXINSNS).
pub const MAX_PROGRAM: usize = 4096;
/// The farthest a classic BPF conditional jump reaches (8 bits).
const MAX_JUMP: usize = u8::MAX as usize;
/// x86-64's audit architecture (`AUDIT_ARCH_X86_64`: EM_X86_64 with the
/// 64-bit and little-endian flags).
pub const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
/// Where the x32 ABI's system call numbers start: the same calls as
/// x86-64's, their numbers with this bit set, under the same audit
/// architecture.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Classic BPF opcodes (linux/bpf_common.h) of the instructions made here.
const LOAD_WORD: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JUMP_IF_EQUAL: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JUMP_IF_AT_LEAST: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const RETURN: u16 = 0x06; // BPF_RET | BPF_K

/// An answer given before the index, in the order given.
#[derive(Clone, Debug)]
pub enum Early {
    /// Every number at or above this one (x32's: [`X32_SYSCALL_BIT`]).
    From(u32, SeccompAction),
    /// This call, whatever its arguments.
    Call(i64, SeccompAction),
}

/// Why a program could not be built.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// seccompiler refused the rules.
    #[error("compiling the rules: {0}")]
    Rules(#[from] seccompiler::BackendError),
    /// A call number that is not one (negative, or past 32 bits).
    #[error("{0} is not a system call number")]
    Number(i64),
    /// One call's rules take more instructions than a conditional jump
    /// passes: the call is not found past them.
    #[error("the rules of system call {call} take {instructions} instructions, more than a classic BPF conditional jump passes ({MAX_JUMP}): give it fewer rules or conditions")]
    CallTooLong { call: u32, instructions: usize },
    /// Half of the index takes more instructions than a conditional jump
    /// passes (about 130 calls without rules, fewer with).
    #[error("{calls} listed calls take {instructions} instructions, more than a classic BPF conditional jump passes ({MAX_JUMP}): list fewer calls or rules")]
    TooMany { calls: usize, instructions: usize },
    /// The program is longer than the kernel takes.
    #[error("the program has {0} instructions, more than the kernel takes ({MAX_PROGRAM})")]
    TooLong(usize),
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The program: the calls `rules` lists, each answered `matched` where one
/// of its rules matches and `otherwise` where none does (a call listed
/// without rules: `matched`), every other call `otherwise`, found by a
/// binary search over the listed numbers; the `early` answers come first.
/// Another architecture than x86-64 kills the process. This is the
/// program seccompiler's `SeccompFilter` makes of the same rules and
/// actions, the early answers aside, with its chain of comparisons made a
/// tree.
pub fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    otherwise: SeccompAction,
    matched: SeccompAction,
    early: &[Early],
) -> Result<BpfProgram, IndexError> {
    // seccompiler's own checks of the filter (identical actions, empty
    // rules) hold here too.
    SeccompFilter::new(rules.clone(), otherwise.clone(), matched.clone(), TargetArch::x86_64)?;
    let number = |number: i64| u32::try_from(number).map_err(|_| IndexError::Number(number));
    let (otherwise, matched) = (u32::from(otherwise), u32::from(matched));
    let mut program = vec![
        insn(LOAD_WORD, 0, 0, ARCH_AT),
        insn(JUMP_IF_EQUAL, 1, 0, AUDIT_ARCH_X86_64),
        insn(RETURN, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        insn(LOAD_WORD, 0, 0, NUMBER_AT),
    ];
    for early in early {
        let (test, k, action) = match early {
            Early::From(first, action) => (JUMP_IF_AT_LEAST, *first, action),
            Early::Call(call, action) => (JUMP_IF_EQUAL, number(*call)?, action),
        };
        program.push(insn(test, 0, 1, k));
        program.push(insn(RETURN, 0, 0, u32::from(action.clone())));
    }
    let listed = rules
        .into_iter()
        .map(|(call, rules)| Ok((number(call)?, chain(rules, matched, otherwise))))
        .collect::<Result<Vec<_>, IndexError>>()?;
    index(&listed, otherwise, &mut program)?;
    if program.len() > MAX_PROGRAM {
        return Err(IndexError::TooLong(program.len()));
    }
    Ok(program)
}

/// What a listed call runs once its number matched: each rule, answering
/// `matched` where it matches (seccompiler's rule code jumps past its
/// answer where a condition fails), then `otherwise`.
fn chain(rules: Vec<SeccompRule>, matched: u32, otherwise: u32) -> Vec<sock_filter> {
    if rules.is_empty() {
        return vec![insn(RETURN, 0, 0, matched)];
    }
    let mut chain = Vec::new();
    for rule in rules {
        chain.extend(BpfProgram::from(rule));
        chain.push(insn(RETURN, 0, 0, matched));
    }
    chain.push(insn(RETURN, 0, 0, otherwise));
    chain
}

/// A binary search over `listed` (sorted by number, each with its chain):
/// a listed number runs its chain, any other returns `otherwise`.
fn index(listed: &[(u32, Vec<sock_filter>)], otherwise: u32, out: &mut Vec<sock_filter>) -> Result<(), IndexError> {
    match listed {
        [] => out.push(insn(RETURN, 0, 0, otherwise)),
        [(number, chain)] => {
            let past_chain = u8::try_from(chain.len())
                .map_err(|_| IndexError::CallTooLong { call: *number, instructions: chain.len() })?;
            out.push(insn(JUMP_IF_EQUAL, 0, past_chain, *number));
            out.extend_from_slice(chain);
            out.push(insn(RETURN, 0, 0, otherwise));
        }
        _ => {
            let (below, from) = listed.split_at(listed.len() / 2);
            let mut lower = Vec::new();
            index(below, otherwise, &mut lower)?;
            let past_lower = u8::try_from(lower.len())
                .map_err(|_| IndexError::TooMany { calls: below.len(), instructions: lower.len() })?;
            // At or above the middle: past the lower half.
            out.push(insn(JUMP_IF_AT_LEAST, past_lower, 0, from[0].0));
            out.extend(lower);
            index(from, otherwise, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
