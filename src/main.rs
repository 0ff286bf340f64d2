//! The `holdpoint` binary: the CLI with the example agents registered.

use holdpoint::workflows::Tools;
use holdpoint::Registry;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(holdpoint::cli::main_with(|data| {
        Tools::new(data.join("tools")).register(Registry::new())
    }));
}
