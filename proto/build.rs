use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("envgate_descriptor.bin"))
        .compile_protos(
            &[
                "proto/envgate/v1/envgate.proto",
                "proto/envgate/admin/v1/admin.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
