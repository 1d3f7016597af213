//! On-disk state under `acme.storage`: one directory per ACME directory
//! (accounts differ between servers), holding `account.json` and one
//! directory per site with `fullchain.pem` + `privkey.pem`.
//!
//! Directories are 0700 and files 0600 (they hold private keys); files are
//! written to a temporary name and renamed, so a crash never leaves half a
//! certificate behind.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use crate::config::acme::Acme;

use super::cert::{self, Served, Source};

/// Paths for one ACME directory inside `storage`.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(acme: &Acme) -> Store {
        Store {
            root: acme.storage.join(directory_key(&acme.directory)),
        }
    }

    pub fn account(&self) -> PathBuf {
        self.root.join("account.json")
    }

    fn site(&self, site: &str) -> PathBuf {
        self.root.join("sites").join(site)
    }

    /// The stored certificate of `site`, if there is a readable one.
    pub fn load(&self, site: &str) -> Option<Served> {
        let dir = self.site(site);
        let chain = fs::read(dir.join("fullchain.pem")).ok()?;
        let key = fs::read(dir.join("privkey.pem")).ok()?;
        match cert::from_pem(&chain, &key, Source::Acme) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(site, dir = %dir.display(), error = %e, "ignoring the stored ACME certificate");
                None
            }
        }
    }

    /// Store a newly issued certificate (key first: a chain without its key
    /// is useless, a key without its chain is ignored).
    pub fn save(&self, site: &str, chain_pem: &str, key_pem: &str) -> std::io::Result<()> {
        let dir = self.site(site);
        private_dir(&dir)?;
        write_private(&dir.join("privkey.pem"), key_pem.as_bytes())?;
        write_private(&dir.join("fullchain.pem"), chain_pem.as_bytes())
    }

    pub fn save_account(&self, json: &[u8]) -> std::io::Result<()> {
        private_dir(&self.root)?;
        write_private(&self.account(), json)
    }
}

/// A file-system-safe name for a directory URL:
/// `https://acme-v02.api.letsencrypt.org/directory` ->
/// `acme-v02.api.letsencrypt.org_directory`.
fn directory_key(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let mut out: String = rest
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    while out.ends_with('_') {
        out.pop();
    }
    out
}

/// Create `dir` and its missing parents with mode 0700; an existing
/// directory keeps its mode (the systemd unit's StateDirectory sets it).
fn private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::directory_key;

    #[test]
    fn directory_keys_are_plain_names() {
        assert_eq!(
            directory_key("https://acme-v02.api.letsencrypt.org/directory"),
            "acme-v02.api.letsencrypt.org_directory"
        );
        assert_eq!(
            directory_key("https://127.0.0.1:14000/dir"),
            "127.0.0.1_14000_dir"
        );
    }
}
