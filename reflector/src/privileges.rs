//! The reflector's own privileges. It needs root only to set up: to claim
//! socket paths, open and lock images, open /dev/kvm, make the driver VMs'
//! cgroups and the jail's directory. With `user` (`--user`) it then becomes
//! that unprivileged user, every thread at once, with no capability left,
//! before it serves its first client: a client that took over the reflector
//! would hold an ordinary user's rights, not root's.
//!
//! What still works unprivileged, and why: driver VMs are jailed in a user
//! namespace, which an unprivileged process may create (mapping only its
//! own id, so its vmms run as the same user, each in namespaces of its
//! own); cgroups are joined through `cgroup.procs` descriptors opened while
//! root; kills go to keepers that run as the same user.
//!
//! Not done here: a host that forbids unprivileged user namespaces
//! (`user.max_user_namespaces = 0`, some LSM policies) cannot restart a
//! driver VM after the switch; the reflector checks this before it
//! switches ([`User::become_it`]).

use std::ffi::CString;
use std::fmt;
use std::os::unix::process::CommandExt;

/// Why the reflector cannot become its configured user.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// The name is not a user of this host, nor a number.
    #[error("user {0:?}: no such user (give a name from /etc/passwd, or UID[:GID])")]
    Unknown(String),
    /// The configured user is root.
    #[error("user {0:?}: is root; give an unprivileged user")]
    Root(String),
    /// The configured user is one other processes share: the kernel's
    /// overflow user (`nobody`), or an id no process can hold.
    #[error(
        "user {spec:?}: {why}; whoever runs as it could trace the driver VMs (it would own their user \
         namespaces): give the reflector a user of its own (e.g. `useradd --system --no-create-home drvm`, \
         then --user drvm)"
    )]
    Shared {
        /// As configured.
        spec: String,
        /// What makes it shared.
        why: String,
    },
    /// A system call of the switch failed.
    #[error("becoming user {user}: {what}: {source}")]
    Switch {
        /// The user.
        user: String,
        /// Which call.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// After the switch, the process still had capabilities or root ids.
    #[error("becoming user {user}: still privileged afterwards ({detail})")]
    StillPrivileged {
        /// The user.
        user: String,
        /// What was left.
        detail: String,
    },
    /// The host does not let an unprivileged process create the user
    /// namespace a jail needs.
    #[error(
        "user {user}: this host forbids unprivileged user namespaces ({source}), so driver VMs could not be \
         restarted after the switch; allow them (sysctl user.max_user_namespaces) or run without --user"
    )]
    NoUserNamespaces {
        /// The user.
        user: String,
        /// The error of a trial.
        source: std::io::Error,
    },
}

/// An unprivileged user to become.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// As configured.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (uid {}, gid {})", self.name, self.uid, self.gid)
    }
}

impl User {
    /// Resolves `spec`: a user name of this host, `UID` (its gid is the
    /// same number) or `UID:GID`. Root is refused, and so is a user other
    /// processes share ([`PrivilegeError::Shared`]): the kernel's overflow
    /// user (`nobody`), which services run as and every unmapped id shows
    /// as, and id 4294967295, which means "unchanged" to the kernel.
    pub fn resolve(spec: &str) -> Result<User, PrivilegeError> {
        let numbers = match spec.split_once(':') {
            Some((uid, gid)) => uid.parse::<u32>().ok().zip(gid.parse::<u32>().ok()),
            None => spec.parse::<u32>().ok().map(|uid| (uid, uid)),
        };
        let (uid, gid) = match numbers {
            Some(ids) => ids,
            None => lookup(spec).ok_or_else(|| PrivilegeError::Unknown(spec.to_owned()))?,
        };
        if uid == 0 || gid == 0 {
            return Err(PrivilegeError::Root(spec.to_owned()));
        }
        let shared = |why: String| Err(PrivilegeError::Shared { spec: spec.to_owned(), why });
        if uid == u32::MAX || gid == u32::MAX {
            return shared("id 4294967295 is the kernel's \"no change\", not an id".to_owned());
        }
        let overflow = (overflow_id("overflowuid"), overflow_id("overflowgid"));
        if uid == overflow.0 || gid == overflow.1 {
            return shared(format!(
                "uid {uid}, gid {gid} is the kernel's overflow user (nobody: uid {}, gid {}), which other \
                 services run as",
                overflow.0, overflow.1
            ));
        }
        Ok(User { name: spec.to_owned(), uid, gid })
    }

    /// Becomes this user: no supplementary groups, then its gid, then its
    /// uid, in every thread (the C library applies each call to all
    /// threads); checks that no capability and no root id is left.
    pub fn become_it(&self) -> Result<(), PrivilegeError> {
        self.check_user_namespaces()?;
        let fail = |what: &'static str| PrivilegeError::Switch {
            user: self.name.clone(),
            what,
            source: std::io::Error::last_os_error(),
        };
        // SAFETY: setgroups(2), setresgid(2), setresuid(2) with plain
        // values; from root to another uid the kernel clears the permitted,
        // effective and ambient capability sets.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0 {
                return Err(fail("dropping supplementary groups"));
            }
            if libc::setresgid(self.gid, self.gid, self.gid) != 0 {
                return Err(fail("setting the gid"));
            }
            if libc::setresuid(self.uid, self.uid, self.uid) != 0 {
                return Err(fail("setting the uid"));
            }
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |key: &str| {
            status.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_owned()).unwrap_or_default()
        };
        let left = ["CapPrm:", "CapEff:", "CapAmb:"]
            .iter()
            .filter(|key| !field(key).trim_start_matches('0').is_empty())
            .map(|key| format!("{key} {}", field(key)))
            .chain(field("Uid:").split_whitespace().any(|id| id == "0").then(|| format!("Uid: {}", field("Uid:"))))
            .collect::<Vec<_>>();
        if !left.is_empty() {
            return Err(PrivilegeError::StillPrivileged { user: self.name.clone(), detail: left.join(", ") });
        }
        Ok(())
    }

    /// Tries, as this user, what every later driver VM start needs: a new
    /// user namespace.
    fn check_user_namespaces(&self) -> Result<(), PrivilegeError> {
        let mut trial = std::process::Command::new("/proc/self/exe");
        trial
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .uid(self.uid)
            .gid(self.gid);
        // SAFETY: the closure runs between fork and exec and makes one
        // async-signal-safe system call.
        unsafe {
            trial.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match trial.status() {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(PrivilegeError::NoUserNamespaces {
                user: self.name.clone(),
                source: std::io::Error::other(format!("a trial ended with {status}")),
            }),
            Err(source) => Err(PrivilegeError::NoUserNamespaces { user: self.name.clone(), source }),
        }
    }
}

/// The kernel's overflow uid or gid (`kind`: `overflowuid`, `overflowgid`),
/// the id `nobody` has; 65534, the kernel's default, if unreadable.
fn overflow_id(kind: &str) -> u32 {
    std::fs::read_to_string(format!("/proc/sys/kernel/{kind}"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(65534)
}

/// The uid and gid of user `name` in this host's user database.
fn lookup(name: &str) -> Option<(u32, u32)> {
    let name = CString::new(name).ok()?;
    // SAFETY: getpwnam_r with a zeroed passwd, a buffer and a result
    // pointer that all outlive the call.
    unsafe {
        let mut entry: libc::passwd = std::mem::zeroed();
        let mut buffer = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let found = libc::getpwnam_r(name.as_ptr(), &mut entry, buffer.as_mut_ptr(), buffer.len(), &mut result);
        (found == 0 && !result.is_null()).then_some((entry.pw_uid, entry.pw_gid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_by_name_or_number_and_root_is_refused() {
        assert_eq!(User::resolve("daemon").map(|u| u.uid).ok(), lookup("daemon").map(|ids| ids.0));
        let numeric = User::resolve("4000:4001").unwrap();
        assert_eq!((numeric.uid, numeric.gid), (4000, 4001));
        assert_eq!(User::resolve("4000").map(|u| (u.uid, u.gid)).ok(), Some((4000, 4000)));
        assert!(matches!(User::resolve("root"), Err(PrivilegeError::Root(_))));
        assert!(matches!(User::resolve("0:5"), Err(PrivilegeError::Root(_))));
        assert!(matches!(User::resolve("no-such-user-here"), Err(PrivilegeError::Unknown(_))));
        assert!(matches!(User::resolve("12:x"), Err(PrivilegeError::Unknown(_))));
    }

    #[test]
    fn a_user_other_processes_share_is_refused() {
        // `nobody` is the overflow user wherever it exists; its ids by
        // number are refused whether or not the name does.
        let (uid, gid) = (overflow_id("overflowuid"), overflow_id("overflowgid"));
        if lookup("nobody").is_some() {
            assert!(matches!(User::resolve("nobody"), Err(PrivilegeError::Shared { .. })));
        }
        for spec in [format!("{uid}"), format!("4000:{gid}"), format!("{uid}:4000")] {
            assert!(matches!(User::resolve(&spec), Err(PrivilegeError::Shared { .. })), "{spec}");
        }
        for spec in ["4294967295", "4000:4294967295", "4294967295:4000"] {
            assert!(matches!(User::resolve(spec), Err(PrivilegeError::Shared { .. })), "{spec}");
        }
        let error = User::resolve(&format!("{uid}")).unwrap_err().to_string();
        assert!(error.contains("overflow user") && error.contains("--user"), "{error}");
    }
}
