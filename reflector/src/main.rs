//! `reflector`: the trusted host daemon that will serve vhost-user block and
//! net devices through driver VMs (see DESIGN.md). It is not built yet: the
//! block path, recovery and net path are open issues. Until then this binary
//! only says so, and exits with status 2.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "reflector: not implemented yet; this build provides the driver VM boot path only (vmm). \
         See README.md for what works today."
    );
    ExitCode::from(2)
}
