# shoal tasks. `just` is optional: every recipe is a plain command you can run yourself.
# Install it with `cargo install just` if you want it.

# The demo: six nodes on this machine, a bad release stopped at the canary.
demo:
    cargo build --release
    ./target/release/shoal demo

# Every test of the workspace (the README's test command).
test:
    scripts/test

# The real-node test: nodelet as a systemd service in a bookworm VM (root, /dev/kvm; docs/vm-test.md).
vm-test:
    scripts/vm-test

# Formatting and lints, as CI runs them.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Regenerate the committed JSON Schema and field reference after changing the types.
schema:
    cargo run --bin shoal -- schema > docs/desiredstate.schema.json
    cargo run --bin shoal -- schema --markdown > docs/manifest-reference.md

# What ships to ARM boards: static aarch64 and armv7 (musl) binaries, size-optimized (docs/install.md).
cross:
    scripts/cross

# The aarch64 build under qemu-aarch64: size budget, the nodelet's unit tests, a smoke test (CI runs it).
arm-test:
    scripts/arm-test

# Fleet benchmark of the apiserver (1,000 and 10,000 simulated nodes); figures go to docs/benchmarks.md.
bench-apiserver:
    cargo build --release --workspace --bins
    cargo bench -p apiserver --bench fleet -- --nodes 1000
    cargo bench -p apiserver --bench fleet -- --nodes 10000

# The fleet benchmark with the store in a throwaway PostgreSQL cluster (apt-get install postgresql).
bench-apiserver-postgres:
    cargo build --release -p apiserver
    cargo bench -p apiserver --bench fleet -- --nodes 1000 --postgres

# Footprint of one nodelet: idle RSS and CPU, and revert time; the shipped build (static,
# `dist` profile) first, then the release build for comparison.
bench-nodelet:
    scripts/cross x86_64-unknown-linux-musl
    cargo build --release --workspace --bins
    SHOAL_TEST_BIN_DIR=$PWD/target/x86_64-unknown-linux-musl/dist cargo bench -p nodelet --bench footprint -- --window 60 --reverts 5
    cargo bench -p nodelet --bench footprint -- --window 60 --reverts 5

# Every benchmark.
bench: bench-apiserver bench-nodelet
