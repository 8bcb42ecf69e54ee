//! `tabby`: the CNI plugin binary. Everything lives in the library except
//! ending the process, which only the binary does.

use std::process::ExitCode;

fn main() -> ExitCode {
    // A panic still ends as one CNI error on stdout and exit status 1: the
    // hook exits right after reporting, before any unwinding through the I/O
    // runtime (and also when built with `panic = "abort"`).
    std::panic::set_hook(Box::new(|info| {
        std::process::exit(i32::from(tabby_cni::report_panic(info)));
    }));
    ExitCode::from(tabby_cni::run())
}
