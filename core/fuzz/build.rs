//! Links the fuzz targets against libFuzzer (its `main` drives
//! `LLVMFuzzerTestOneInput`). `DENOVISOR_LIBFUZZER` names `libFuzzer.a`;
//! scripts/fuzz.ts downloads Debian's and sets it.

fn main() {
    println!("cargo:rerun-if-env-changed=DENOVISOR_LIBFUZZER");
    match std::env::var("DENOVISOR_LIBFUZZER") {
        Ok(path) => {
            println!("cargo:rustc-link-arg-bins={path}");
            println!("cargo:rustc-link-arg-bins=-lstdc++");
        }
        Err(_) => {
            println!("cargo:warning=DENOVISOR_LIBFUZZER is not set: build with `deno task fuzz`")
        }
    }
}
