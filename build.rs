//! With the `cuda` feature, compiles Arbiter's own kernels (`kernels/*.cu`) to PTX; the
//! constants (one per file, e.g. `CAUSAL_SOFTMAX`) land in `$OUT_DIR/kernels.rs`. Rebuilds the
//! crate when a migration is added.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    // `sqlx::migrate!` embeds these directories: a new migration alone must rebuild the crate
    println!("cargo::rerun-if-changed=migrations");
    #[cfg(feature = "cuda")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let ptx = cudaforge::KernelBuilder::new()
            .source_dir("kernels")
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .expect("compiling kernels/*.cu with nvcc");
        ptx.write(out.join("kernels.rs")).expect("writing the PTX bindings");
    }
}
