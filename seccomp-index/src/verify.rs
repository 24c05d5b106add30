//! Checking a program against seccompiler's own: for the tests of the
//! filters built with [`compile`](crate::compile), so that each user runs
//! its real rules, not a look-alike, through the comparison.
//!
//! [`against_seccompiler`] builds both programs of the same rules and runs
//! them in a classic-BPF interpreter that does what the kernel does with
//! the instructions either emits: every listed call, its neighbours and
//! x32 twins, the first 1,024 numbers of x86-64 and of x32 and the edges
//! of the 32-bit range, under x86-64 and five other architecture values;
//! a listed call with arguments that take every path through its rules in
//! either program (found by flipping one comparison at a time: a value
//! that turns each branch the other way, as a concolic tester does), an
//! unlisted one with a few.

use std::collections::{BTreeMap, BTreeSet};

use seccompiler::{sock_filter, BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

use crate::{
    compile, Early, IndexError, ARCH_AT, AUDIT_ARCH_X86_64, JUMP_IF_AT_LEAST, JUMP_IF_EQUAL, LOAD_WORD, MAX_PROGRAM,
    NUMBER_AT, RETURN, X32_SYSCALL_BIT,
};

/// BPF_JMP | BPF_JA: seccompiler's rules use it past long conditions.
const JUMP: u16 = 0x05;
/// BPF_JMP | BPF_JGT | BPF_K.
const JUMP_IF_ABOVE: u16 = 0x25;
/// BPF_ALU | BPF_AND | BPF_K.
const AND: u16 = 0x54;
/// Where `struct seccomp_data`'s arguments are: six 64-bit words.
const ARGS_AT: u32 = 16;
/// Argument sets explored for one call in one program, at most (each
/// takes a path of its own; the project's filters need a few dozen).
const MAX_PATHS: usize = 4096;
/// Sets every call is tried with: none, all and some bits.
const PLAIN_SETS: [[u64; 6]; 3] = [[0; 6], [u64::MAX; 6], [0x5555_5555_aaaa_aaaa; 6]];

/// Architecture values tried: x86-64 and others (i386, AArch64, none, all
/// bits, x86-64 without its 64-bit flag).
const ARCHES: [u32; 6] =
    [AUDIT_ARCH_X86_64, 3 | 0x4000_0000, 0xc000_00b7, 0, u32::MAX, AUDIT_ARCH_X86_64 & !0x8000_0000];

/// Why a program did not pass.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// [`compile`] refused the rules.
    #[error("building the indexed program: {0}")]
    Index(#[from] IndexError),
    /// seccompiler refused them.
    #[error("building seccompiler's program: {0}")]
    Rules(#[from] seccompiler::BackendError),
    /// A program the interpreter could not run to an answer (an
    /// instruction neither compiler emits, a jump out of it, a load past
    /// `struct seccomp_data`): the kernel would have refused it.
    #[error("{which} program: {why} at instruction {at}")]
    Program { which: &'static str, at: usize, why: String },
    /// The two programs answered one call differently.
    #[error("call {number:#x} of architecture {arch:#x} with {args:x?}: the index answers {indexed:#x}, seccompiler {expected:#x}")]
    Differs { number: u32, arch: u32, args: [u64; 6], indexed: u32, expected: u32 },
}

/// What was compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// Calls answered (number, architecture and arguments).
    pub calls: usize,
    /// Instructions of the indexed program.
    pub instructions: usize,
    /// The most instructions it ran for one call.
    pub longest_walk: usize,
}

/// Checks that [`compile`] of these rules answers every call tried as
/// seccompiler's `SeccompFilter` of the same rules does, but where `early`
/// answers first (for x86-64's numbers only: another architecture is
/// killed before).
pub fn against_seccompiler(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    otherwise: SeccompAction,
    matched: SeccompAction,
    early: &[Early],
) -> Result<Checked, VerifyError> {
    let plain: BpfProgram =
        SeccompFilter::new(rules.clone(), otherwise.clone(), matched.clone(), TargetArch::x86_64)?.try_into()?;
    let listed: BTreeSet<u32> = rules.keys().filter_map(|call| u32::try_from(*call).ok()).collect();
    let indexed = compile(rules, otherwise, matched, early)?;
    compare(&plain, &indexed, &listed, early)
}

/// Runs `indexed` and `plain` (seccompiler's program of the rules that list
/// `listed`) on the calls tried; `early`, the answers `indexed` gives first.
pub(crate) fn compare(
    plain: &[sock_filter],
    indexed: &[sock_filter],
    listed: &BTreeSet<u32>,
    early: &[Early],
) -> Result<Checked, VerifyError> {
    let mut checked = Checked { calls: 0, instructions: indexed.len(), longest_walk: 0 };
    for number in numbers(listed, early) {
        let mut sets: BTreeSet<[u64; 6]> = PLAIN_SETS.into_iter().collect();
        if listed.contains(&number) {
            sets.extend(paths(plain, number).map_err(|refused| refused.of("seccompiler's"))?);
            sets.extend(paths(indexed, number).map_err(|refused| refused.of("the indexed"))?);
        }
        let sets: Vec<[u64; 6]> = sets.into_iter().collect();
        let answered_early = early.iter().find_map(|early| match early {
            Early::From(first, action) if number >= *first => Some(u32::from(action.clone())),
            Early::Call(call, action) if i64::from(number) == *call => Some(u32::from(action.clone())),
            _ => None,
        });
        for arch in ARCHES {
            // Another architecture is refused before any argument is read.
            let sets = if arch == AUDIT_ARCH_X86_64 { &sets[..] } else { &sets[..1] };
            for args in sets {
                let expected = match answered_early {
                    Some(answer) if arch == AUDIT_ARCH_X86_64 => answer,
                    _ => run(plain, number, arch, *args).map_err(|refused| refused.of("seccompiler's"))?.0,
                };
                let (answer, walk) = run(indexed, number, arch, *args).map_err(|refused| refused.of("the indexed"))?;
                if answer != expected {
                    return Err(VerifyError::Differs { number, arch, args: *args, indexed: answer, expected });
                }
                checked.calls += 1;
                checked.longest_walk = checked.longest_walk.max(walk);
            }
        }
    }
    Ok(checked)
}

/// Where and why a program could not be run to an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The instruction.
    pub at: usize,
    /// What was wrong with it.
    pub why: String,
}

impl Refused {
    fn of(self, which: &'static str) -> VerifyError {
        VerifyError::Program { which, at: self.at, why: self.why }
    }
}

/// Runs `program` as the kernel would on a system call `number` of `arch`
/// with `args`: its answer and how many instructions it ran.
pub fn run(program: &[sock_filter], number: u32, arch: u32, args: [u64; 6]) -> Result<(u32, usize), Refused> {
    let walk = walk(program, number, arch, args)?;
    Ok((walk.answer, walk.steps))
}

/// One run of a program.
struct Walk {
    answer: u32,
    steps: usize,
    /// Each conditional jump taken on an argument: where, which way.
    branches: Vec<Branch>,
}

/// A conditional jump on (a masked half of) an argument.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Branch {
    at: usize,
    taken: bool,
    /// The argument and whether its high half.
    half: (usize, bool),
    /// The constant it compared with, and the mask applied before.
    k: u32,
    mask: u32,
}

fn walk(program: &[sock_filter], number: u32, arch: u32, args: [u64; 6]) -> Result<Walk, Refused> {
    let refused = |at: usize, why: String| Refused { at, why };
    if program.is_empty() || program.len() > MAX_PROGRAM {
        return Err(refused(0, format!("{} instructions (the kernel takes 1 to {MAX_PROGRAM})", program.len())));
    }
    let (mut accumulator, mut at, mut steps) = (0u32, 0usize, 0usize);
    // Which argument half the accumulator holds, and the mask applied.
    let mut source: Option<((usize, bool), u32)> = None;
    let mut branches = Vec::new();
    loop {
        let Some(insn) = program.get(at) else {
            return Err(refused(at, "a jump past the end".into()));
        };
        steps += 1;
        at += 1;
        let mut branch = |taken: bool| {
            if let Some((half, mask)) = source {
                branches.push(Branch { at: at - 1, taken, half, k: insn.k, mask });
            }
            usize::from(if taken { insn.jt } else { insn.jf })
        };
        match insn.code {
            LOAD_WORD => {
                (accumulator, source) = match insn.k {
                    NUMBER_AT => (number, None),
                    ARCH_AT => (arch, None),
                    // Each argument little-endian: its low half first.
                    k @ ARGS_AT..=60 if k % 4 == 0 => {
                        let (position, high) = ((k - ARGS_AT) as usize / 8, (k - ARGS_AT) % 8 == 4);
                        let arg = args[position];
                        (if high { (arg >> 32) as u32 } else { arg as u32 }, Some(((position, high), u32::MAX)))
                    }
                    k => return Err(refused(at - 1, format!("a load from offset {k}"))),
                }
            }
            AND => {
                accumulator &= insn.k;
                source = source.map(|(half, mask)| (half, mask & insn.k));
            }
            JUMP => at += insn.k as usize,
            JUMP_IF_EQUAL => at += branch(accumulator == insn.k),
            JUMP_IF_ABOVE => at += branch(accumulator > insn.k),
            JUMP_IF_AT_LEAST => at += branch(accumulator >= insn.k),
            RETURN => return Ok(Walk { answer: insn.k, steps, branches }),
            other => return Err(refused(at - 1, format!("opcode {other:#x}"))),
        }
    }
}

/// Argument sets that take every path `program` has for call `number`
/// (x86-64), up to [`MAX_PATHS`]: from each set found, each comparison on
/// an argument is turned the other way by a value for that half (the
/// constant, its neighbours, the bits outside the mask flipped), keeping
/// each set that takes a path not seen before.
fn paths(program: &[sock_filter], number: u32) -> Result<Vec<[u64; 6]>, Refused> {
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    let mut queue: std::collections::VecDeque<[u64; 6]> = PLAIN_SETS.into_iter().collect();
    while let Some(args) = queue.pop_front() {
        if found.len() >= MAX_PATHS {
            break;
        }
        let walk = walk(program, number, AUDIT_ARCH_X86_64, args)?;
        let path: Vec<(usize, bool)> = walk.branches.iter().map(|branch| (branch.at, branch.taken)).collect();
        if !seen.insert(path) {
            continue;
        }
        found.push(args);
        for branch in &walk.branches {
            let (position, high) = branch.half;
            let shift = if high { 32 } else { 0 };
            let now = (args[position] >> shift) as u32;
            let (k, outside) = (branch.k, !branch.mask);
            for value in
                [k, k.wrapping_add(1), k.wrapping_sub(1), k | (now & outside), now ^ outside, !now, 0, u32::MAX]
            {
                let mut next = args;
                next[position] = (next[position] & !(0xffff_ffff_u64 << shift)) | (u64::from(value) << shift);
                queue.push_back(next);
            }
        }
    }
    Ok(found)
}

/// The numbers tried: the first 1,024 of x86-64 and of x32, each listed
/// or early call with its neighbours and its x32 twin, the edges of the
/// 32-bit range.
fn numbers(listed: &BTreeSet<u32>, early: &[Early]) -> BTreeSet<u32> {
    let named = early.iter().filter_map(|early| match early {
        Early::From(first, _) => Some(*first),
        Early::Call(call, _) => u32::try_from(*call).ok(),
    });
    let mut numbers: BTreeSet<u32> = (0..1024).chain(X32_SYSCALL_BIT..X32_SYSCALL_BIT + 1024).collect();
    for number in listed.iter().copied().chain(named) {
        for near in [number.wrapping_sub(1), number, number.wrapping_add(1)] {
            numbers.extend([near, near | X32_SYSCALL_BIT, near & !X32_SYSCALL_BIT]);
        }
    }
    numbers.extend([X32_SYSCALL_BIT - 1, 0x7fff_ffff, 0x8000_0000, 0xbfff_ffff, u32::MAX - 1, u32::MAX]);
    numbers
}
