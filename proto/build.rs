//! Compiles coordinator.proto with a vendored protoc, so a fresh machine needs no install.

fn main() {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    println!("cargo:rerun-if-changed=coordinator.proto");
    tonic_prost_build::compile_protos("coordinator.proto").expect("compile coordinator.proto");
}
