//! `shoal`: the operator CLI.

fn main() -> std::process::ExitCode {
    apiserver::cli::main()
}
