//! Compiles `proto/dbmazz.proto` (the control API) with `protox`, a protobuf compiler in
//! Rust, so building needs no `protoc`; writes the descriptor set for server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../proto/dbmazz.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("dbmazz_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
