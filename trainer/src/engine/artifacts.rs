//! The injector's five artifacts.

use std::path::Path;

use serde::Serialize;

use super::error::OpError;
use super::ops::Ops;

pub const BUG_INJECT_DIFF: &str = "bug_inject.diff";
pub const TEST_WEAKEN_DIFF: &str = "test_weaken.diff";
pub const TEST_FILES_TXT: &str = "test_files.txt";
pub const TEST_SCRIPT_SH: &str = "test_script.sh";
pub const TEST_PARSER_PY: &str = "test_parser.py";

/// The five files, each `None` when the injector did not write it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Artifacts {
    pub bug_inject_diff: Option<String>,
    pub test_weaken_diff: Option<String>,
    pub test_files: Option<String>,
    pub test_script: Option<String>,
    pub test_parser: Option<String>,
}

impl Artifacts {
    /// Reads the files from a directory; a missing file is `None`, a file that is not UTF-8
    /// is an error.
    pub fn from_dir(dir: &Path) -> std::io::Result<Self> {
        let read = |name: &str| -> std::io::Result<Option<String>> {
            match std::fs::read(dir.join(name)) {
                Ok(b) => String::from_utf8(b).map(Some).map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} is not UTF-8", dir.join(name).display()),
                    )
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        };
        Ok(Self {
            bug_inject_diff: read(BUG_INJECT_DIFF)?,
            test_weaken_diff: read(TEST_WEAKEN_DIFF)?,
            test_files: read(TEST_FILES_TXT)?,
            test_script: read(TEST_SCRIPT_SH)?,
            test_parser: read(TEST_PARSER_PY)?,
        })
    }

    /// Writes the present files into `dir` (created).
    pub fn write_dir(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (name, content) in self.files() {
            if let Some(c) = content {
                std::fs::write(dir.join(name), c)?;
            }
        }
        Ok(())
    }

    /// Reads the files from `dir` inside a sandbox's workspace. Bytes that are not UTF-8 are
    /// replaced, so a diff with binary garbage fails validation instead of the episode.
    pub async fn from_workspace(ops: Ops<'_>, dir: &str) -> Result<Self, OpError> {
        let read = |name: &'static str| async move {
            let path = format!("{}/{name}", dir.trim_end_matches('/'));
            ops.read_file(&path)
                .await
                .map(|o| o.map(|b| String::from_utf8_lossy(&b).into_owned()))
        };
        Ok(Self {
            bug_inject_diff: read(BUG_INJECT_DIFF).await?,
            test_weaken_diff: read(TEST_WEAKEN_DIFF).await?,
            test_files: read(TEST_FILES_TXT).await?,
            test_script: read(TEST_SCRIPT_SH).await?,
            test_parser: read(TEST_PARSER_PY).await?,
        })
    }

    fn files(&self) -> [(&'static str, &Option<String>); 5] {
        [
            (BUG_INJECT_DIFF, &self.bug_inject_diff),
            (TEST_WEAKEN_DIFF, &self.test_weaken_diff),
            (TEST_FILES_TXT, &self.test_files),
            (TEST_SCRIPT_SH, &self.test_script),
            (TEST_PARSER_PY, &self.test_parser),
        ]
    }

    /// The paths listed in `test_files.txt`: one per line, blank lines and `#` comments
    /// skipped, a leading `./` dropped.
    pub fn test_file_list(&self) -> Vec<String> {
        let mut seen = std::collections::BTreeSet::new();
        self.test_files
            .as_deref()
            .unwrap_or("")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.strip_prefix("./").unwrap_or(l).to_string())
            .filter(|l| seen.insert(l.clone()))
            .collect()
    }
}
