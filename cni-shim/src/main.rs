//! `tabby`: the CNI plugin binary. Everything lives in the library.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(tabby_cni::run())
}
