//! Replays the committed corpus (`corpus/<target>/*`) through every target this build has:
//! what stable runs in place of fuzzing (`scripts/fuzz.sh`). An input that panics a target
//! fails the test, named.

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_target_has_a_corpus() {
    for target in baton_fuzz::ALL_TARGETS {
        assert!(!corpus(target).is_empty(), "corpus/{target} is empty");
    }
}

#[test]
fn the_corpus_replays_through_every_target() {
    for (target, run) in baton_fuzz::targets() {
        let files = corpus(target);
        for file in &files {
            let data = std::fs::read(file).expect("a corpus file");
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                panic!("{target} panics on {}", file.display());
            }
        }
        eprintln!("{target}: {} inputs replayed", files.len());
    }
}
