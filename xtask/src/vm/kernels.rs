//! Kernels to boot: Debian's packaged kernels, fetched with `apt-get
//! download` and unpacked with `dpkg -x` into `~/.cache/mesh-dev/kernels`,
//! or one given by path.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// A bootable kernel and its modules.
pub struct Kernel {
    /// The release (`uname -r`), e.g. `6.1.0-57-amd64`.
    pub release: String,
    pub bzimage: PathBuf,
    /// `lib/modules/<release>`, when the kernel comes with modules.
    pub modules: Option<PathBuf>,
}

/// Debian 12's own kernel series (the README's test command boots it).
pub const DEBIAN_12: &str = "6.1";

pub fn cache() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(Path::new(&home).join(".cache/mesh-dev/kernels"))
}

/// Every kernel unpacked in the cache, oldest first.
pub fn cached() -> Result<Vec<Kernel>> {
    let dir = cache()?;
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        if let Ok(k) = from_tree(&e.path()) {
            out.push(k);
        }
    }
    out.sort_by_key(|k| version_key(&k.release));
    Ok(out)
}

/// A kernel tree laid out as `dpkg -x` leaves it (`boot/vmlinuz-R`,
/// `lib/modules/R`), or a bzImage file (its modules built in).
pub fn from_path(path: &Path) -> Result<Kernel> {
    if path.is_dir() {
        return from_tree(path);
    }
    if !path.is_file() {
        bail!("--kernel {}: no such file or directory", path.display());
    }
    Ok(Kernel {
        release: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        bzimage: path.to_path_buf(),
        modules: None,
    })
}

fn from_tree(dir: &Path) -> Result<Kernel> {
    let boot = dir.join("boot");
    let release = std::fs::read_dir(&boot)
        .with_context(|| format!("{}: no boot/ directory", dir.display()))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_owned)
        })
        .next()
        .with_context(|| format!("{}: no boot/vmlinuz-*", boot.display()))?;
    // Debian puts them in lib/modules; merged-/usr packages in usr/lib.
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| dir.join(d).join(&release))
        .find(|m| m.is_dir())
        .unwrap_or_else(|| dir.join("lib/modules").join(&release));
    Ok(Kernel {
        bzimage: boot.join(format!("vmlinuz-{release}")),
        modules: modules.is_dir().then_some(modules),
        release,
    })
}

/// The cached kernel of `series` (e.g. "6.1"), fetching the newest
/// package of that series when none is cached or `refresh` is set.
pub fn debian(series: &str, refresh: bool) -> Result<Kernel> {
    if !refresh
        && let Some(k) = cached()?
            .into_iter()
            .rev()
            .find(|k| in_series(&k.release, series))
    {
        return Ok(k);
    }
    let pkg = newest_package(Some(series))?;
    fetch(&pkg)
}

/// The newest amd64 kernel package the package registry offers.
pub fn debian_newest(refresh: bool) -> Result<Kernel> {
    let pkg = newest_package(None)?;
    let release = pkg.trim_start_matches("linux-image-");
    if !refresh && let Some(k) = cached()?.into_iter().find(|k| k.release == release) {
        return Ok(k);
    }
    fetch(&pkg)
}

fn in_series(release: &str, series: &str) -> bool {
    release
        .strip_prefix(series)
        .is_some_and(|r| r.starts_with('.') || r.starts_with('-'))
}

/// `linux-image-<release>` for the plain amd64 flavour (not cloud, rt
/// or debug), the highest version, of `series` when given.
fn newest_package(series: Option<&str>) -> Result<String> {
    let search = || -> Result<Vec<String>> {
        let out = Command::new("apt-cache")
            .args(["search", "--names-only", r"^linux-image-[0-9.]+.*-amd64$"])
            .output()
            .context("apt-cache (Debian's apt) is needed to find kernels")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|p| {
                let r = p.trim_start_matches("linux-image-");
                !r.contains("cloud")
                    && !r.contains("-rt-")
                    && !r.contains("dbg")
                    && !r.contains("unsigned")
                    && series.is_none_or(|s| in_series(r, s))
            })
            .map(str::to_owned)
            .collect())
    };
    let mut found = search()?;
    if found.is_empty() {
        // A fresh machine may have no package lists yet.
        let _ = Command::new("apt-get").args(["update", "-q"]).status();
        found = search()?;
    }
    found
        .into_iter()
        .max_by_key(|p| version_key(p))
        .with_context(|| {
            format!(
                "no linux-image package{} in the package registry",
                series
                    .map(|s| format!(" of series {s}"))
                    .unwrap_or_default()
            )
        })
}

/// Numbers in a release, for ordering (`6.1.0-57` < `6.12.117+deb12`).
fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn fetch(pkg: &str) -> Result<Kernel> {
    let dir = cache()?;
    let dl = dir.join("download");
    std::fs::create_dir_all(&dl)?;
    eprintln!("xtask: fetching {pkg}");
    let s = Command::new("apt-get")
        .args(["download", "-q", pkg])
        .current_dir(&dl)
        .status()
        .context("apt-get download")?;
    if !s.success() {
        bail!("apt-get download {pkg} failed");
    }
    let deb = std::fs::read_dir(&dl)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
        })
        .with_context(|| format!("apt-get download left no {pkg}_*.deb"))?;
    let release = pkg.trim_start_matches("linux-image-");
    let tree = dir.join(release);
    let _ = std::fs::remove_dir_all(&tree);
    let s = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(&tree)
        .status()
        .context("dpkg -x")?;
    if !s.success() {
        bail!("dpkg -x {} failed", deb.display());
    }
    // The unpacked tree is the cache; the package is not needed again.
    std::fs::remove_file(&deb)?;
    from_tree(&tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_numerically() {
        assert!(version_key("6.1.0-57-amd64") < version_key("6.12.117+deb12-amd64"));
        assert!(version_key("6.1.0-9-amd64") < version_key("6.1.0-57-amd64"));
        assert!(in_series("6.1.0-57-amd64", "6.1"));
        assert!(!in_series("6.12.117+deb12-amd64", "6.1"));
    }
}
