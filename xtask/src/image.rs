//! `cargo xtask image`: container images without any registry.
//!
//! Nothing can be pulled, so each image is built from scratch: the release
//! binaries plus exactly the shared libraries `ldd` says they link (and the
//! dynamic loader), a passwd entry for the non-root user 65532, and a data
//! directory that user owns. One reproducible tar layer (sorted, numeric
//! owners, mtime 0) is
//! - loaded into the local Docker engine with a `FROM scratch` Dockerfile
//!   (`ADD layer.tar /` keeps the owners), tagged `dsync/<name>:<version>`;
//! - written as an OCI image layout archive,
//!   `target/images/<name>-<version>.oci.tar`, for registries and tools
//!   that take OCI (skopeo, crane, containerd's `ctr import`).
//!
//! `deploy/Dockerfile` is the conventional multi-stage build for users who
//! can pull a Rust base image.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cargo, run, Result};

pub struct Image {
    pub name: &'static str,
    /// Binaries (from target/release) put in /usr/local/bin; the first is
    /// the entrypoint.
    pub bins: &'static [&'static str],
    pub env: &'static [(&'static str, &'static str)],
    pub port: Option<u16>,
}

/// Service images, then the e2e driver's. A new service is one entry.
pub const IMAGES: &[Image] = &[
    Image {
        name: "lock-svc",
        bins: &["lock-svc", "dsync"],
        env: &[
            ("DSYNC_LISTEN", "0.0.0.0:7001"),
            ("DSYNC_DATA_DIR", "/var/lib/dsync"),
        ],
        port: Some(7001),
    },
    Image {
        name: "queue-svc",
        bins: &["queue-svc", "dsync"],
        env: &[
            ("DSYNC_LISTEN", "0.0.0.0:7001"),
            ("DSYNC_DATA_DIR", "/var/lib/dsync"),
        ],
        port: Some(7001),
    },
    Image {
        name: "cache-svc",
        bins: &["cache-svc", "dsync"],
        env: &[
            ("DSYNC_LISTEN", "0.0.0.0:7001"),
            ("DSYNC_DATA_DIR", "/var/lib/dsync"),
        ],
        port: Some(7001),
    },
    Image {
        name: "e2e",
        bins: &["dsync-e2e"],
        env: &[],
        port: None,
    },
];

pub fn tag(name: &str) -> String {
    format!("dsync/{name}:{}", crate::manifests::VERSION)
}

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Absolute paths of the shared objects `bin` loads, loader included.
fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = sh(Command::new("ldd").arg(bin))?;
    let mut libs = Vec::new();
    for line in out.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x…)"; vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

fn sha256(path: &Path) -> Result<String> {
    let out = sh(Command::new("sha256sum").arg(path))?;
    Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
}

/// Builds the release binaries and every image.
pub fn build_all() -> Result {
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "lock-svc",
        "-p",
        "queue-svc",
        "-p",
        "cache-svc",
        "-p",
        "client",
        "-p",
        "e2e",
    ]);
    run(build)?;
    for img in IMAGES {
        build_one(img)?;
    }
    Ok(())
}

fn build_one(img: &Image) -> Result {
    let target = crate::target_dir();
    let stage = target.join("images").join(img.name);
    let rootfs = stage.join("rootfs");
    let _ = std::fs::remove_dir_all(&stage);
    for d in ["usr/local/bin", "etc", "tmp", "var/lib/dsync"] {
        std::fs::create_dir_all(rootfs.join(d)).map_err(|e| e.to_string())?;
    }
    let mut libs = Vec::new();
    for bin in img.bins {
        let src = target.join("release").join(bin);
        let dst = rootfs.join("usr/local/bin").join(bin);
        std::fs::copy(&src, &dst).map_err(|e| format!("copy {}: {e}", src.display()))?;
        // Release builds keep line tables for profiling; images need none.
        sh(Command::new("strip").arg("--strip-debug").arg(&dst))?;
        libs.extend(shared_libs(&src)?);
    }
    libs.sort();
    libs.dedup();
    for lib in &libs {
        let dst = rootfs.join(lib.strip_prefix("/").expect("absolute"));
        std::fs::create_dir_all(dst.parent().expect("has parent")).map_err(|e| e.to_string())?;
        // Follow symlinks: copy the library's contents under its linked name.
        std::fs::copy(lib, &dst).map_err(|e| format!("copy {}: {e}", lib.display()))?;
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/var/lib/dsync:/sbin/nologin\n",
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnonroot:x:65532:\n")
        .map_err(|e| e.to_string())?;
    std::fs::write(rootfs.join("etc/nsswitch.conf"), "hosts: files dns\n")
        .map_err(|e| e.to_string())?;
    // Owners: everything root, the data dir and /tmp the non-root user.
    sh(Command::new("chown").args(["-R", "0:0"]).arg(&rootfs))?;
    sh(Command::new("chown")
        .args(["65532:65532"])
        .arg(rootfs.join("var/lib/dsync")))?;
    sh(Command::new("chmod").args(["1777"]).arg(rootfs.join("tmp")))?;
    let layer = stage.join("layer.tar");
    sh(Command::new("tar")
        .args([
            "--sort=name",
            "--numeric-owner",
            "--mtime=@0",
            "--format=posix",
        ])
        .args(["--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime"])
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."))?;

    // 1. The local Docker engine.
    let entry = format!("/usr/local/bin/{}", img.bins[0]);
    let mut dockerfile = String::from("FROM scratch\nADD layer.tar /\n");
    for (k, v) in img.env {
        dockerfile.push_str(&format!("ENV {k}={v}\n"));
    }
    if let Some(p) = img.port {
        dockerfile.push_str(&format!("EXPOSE {p}\n"));
    }
    dockerfile.push_str(&format!(
        "USER 65532:65532\nWORKDIR /var/lib/dsync\nENTRYPOINT [\"{entry}\"]\n"
    ));
    std::fs::write(stage.join("Dockerfile"), dockerfile).map_err(|e| e.to_string())?;
    let mut docker = Command::new("docker");
    docker
        .args(["build", "--quiet", "-t", &tag(img.name)])
        .arg(&stage);
    run(docker)?;

    // 2. An OCI image layout archive of the same layer.
    let oci = stage.join("oci");
    let blobs = oci.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| e.to_string())?;
    let layer_digest = sha256(&layer)?;
    let layer_size = std::fs::metadata(&layer).map_err(|e| e.to_string())?.len();
    std::fs::copy(&layer, blobs.join(&layer_digest)).map_err(|e| e.to_string())?;
    let env: Vec<String> = img
        .env
        .iter()
        .map(|(k, v)| format!("\"{k}={v}\""))
        .collect();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"User":"65532:65532","Env":[{env}],"Entrypoint":["{entry}"],"WorkingDir":"/var/lib/dsync"}},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_digest}"]}}}}"#,
        env = env.join(",")
    );
    let config_path = stage.join("config.json");
    std::fs::write(&config_path, &config).map_err(|e| e.to_string())?;
    let config_digest = sha256(&config_path)?;
    std::fs::copy(&config_path, blobs.join(&config_digest)).map_err(|e| e.to_string())?;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{layer_digest}","size":{layer_size}}}]}}"#,
        config.len()
    );
    let manifest_path = stage.join("manifest.json");
    std::fs::write(&manifest_path, &manifest).map_err(|e| e.to_string())?;
    let manifest_digest = sha256(&manifest_path)?;
    std::fs::copy(&manifest_path, blobs.join(&manifest_digest)).map_err(|e| e.to_string())?;
    std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(|e| e.to_string())?;
    std::fs::write(
        oci.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_digest}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"{}"}}}}]}}"#,
            manifest.len(),
            tag(img.name)
        ),
    )
    .map_err(|e| e.to_string())?;
    let archive = target.join("images").join(format!(
        "{}-{}.oci.tar",
        img.name,
        crate::manifests::VERSION
    ));
    sh(Command::new("tar")
        .args([
            "--sort=name",
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--mtime=@0",
        ])
        .arg("-C")
        .arg(&oci)
        .arg("-cf")
        .arg(&archive)
        .arg("."))?;
    println!(
        "image {} ({} MiB layer, {} shared libraries) loaded into Docker; OCI archive {}",
        tag(img.name),
        layer_size / (1 << 20),
        libs.len(),
        archive.display()
    );
    Ok(())
}
