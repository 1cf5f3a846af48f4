//! Start-up reconciliation through the real server: a restart flags checkpoint rows whose
//! directory is gone and removes the temporary files an interrupted write left behind, and old
//! dataset files no row names.

mod common;

use std::time::{Duration, SystemTime};

use common::spawn;

fn age(path: &std::path::Path, by: Duration) {
    let f = std::fs::File::options().write(true).open(path).or_else(|_| std::fs::File::open(path)).unwrap();
    f.set_modified(SystemTime::now() - by).unwrap();
}

#[tokio::test]
async fn a_restart_flags_missing_checkpoints_and_removes_orphan_temporaries() {
    let a = spawn().start().await;
    let ds = a.create_dataset(6).await;
    let job = a.create_job(&ds).await;
    let job_id = job["id"].as_str().unwrap().to_string();
    let data = a.data_dir();
    let dir = a.dir.clone();

    // Two checkpoints: one whose directory exists, one whose directory was lost.
    let kept = data.join("jobs").join(&job_id).join("checkpoints").join("step-00000005");
    std::fs::create_dir_all(&kept).unwrap();
    let lost = data.join("jobs").join(&job_id).join("checkpoints").join("step-00000010");
    a.store.insert_checkpoint(&job_id, 1, 5, &kept.display().to_string(), None, 1).await.unwrap();
    a.store.insert_checkpoint(&job_id, 1, 10, &lost.display().to_string(), None, 2).await.unwrap();
    let before = a.get_json(&format!("/v1/fine-tuning/jobs/{job_id}/checkpoints")).await;
    assert!(before["data"].as_array().unwrap().iter().all(|c| c["file_missing"] == false), "{before}");

    // Leftovers of interrupted writes: a half-written checkpoint of a job that is not running,
    // an old temporary dataset file, and a young one (maybe another process writing it now).
    let half_checkpoint = data.join("jobs").join(&job_id).join("checkpoints").join("step-00000015.tmp");
    std::fs::create_dir_all(&half_checkpoint).unwrap();
    std::fs::write(half_checkpoint.join("trainable.safetensors"), b"partial").unwrap();
    let old_tmp = data.join("datasets").join("0190-old.jsonl.1234.tmp");
    std::fs::write(&old_tmp, b"{\"partial\":").unwrap();
    age(&old_tmp, Duration::from_secs(3600));
    // named as the service names a dataset file, with no row
    let unreferenced = data.join("datasets").join("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b.jsonl");
    std::fs::write(&unreferenced, b"{}\n").unwrap();
    age(&unreferenced, Duration::from_secs(3600));
    // put there by hand: not the service's to remove
    let by_hand = data.join("datasets").join("notes.jsonl");
    std::fs::write(&by_hand, b"{}\n").unwrap();
    age(&by_hand, Duration::from_secs(3600));
    let young_tmp = data.join("datasets").join("0190-young.jsonl.5678.tmp");
    std::fs::write(&young_tmp, b"{\"partial\":").unwrap();
    let dataset_files: Vec<_> = std::fs::read_dir(data.join("datasets")).unwrap().flatten().map(|e| e.path()).collect();
    a.shutdown().await;

    let b = spawn().in_dir(dir).start().await;
    let after = b.get_json(&format!("/v1/fine-tuning/jobs/{job_id}/checkpoints")).await;
    let flags: Vec<(i64, bool)> =
        after["data"].as_array().unwrap().iter().map(|c| (c["step"].as_i64().unwrap(), c["file_missing"].as_bool().unwrap())).collect();
    assert_eq!(flags, [(10, true), (5, false)]);
    assert!(!half_checkpoint.exists(), "a half-written checkpoint of an idle job is removed");
    assert!(!old_tmp.exists(), "an old temporary dataset file is removed");
    assert!(young_tmp.exists(), "a young temporary file may be another process's write in progress");
    assert!(kept.exists());
    assert!(!unreferenced.exists(), "an old dataset file that no row names is removed");
    assert!(by_hand.exists(), "a file the service did not name stays");
    for f in dataset_files.iter().filter(|p| !p.to_string_lossy().ends_with(".tmp") && **p != unreferenced) {
        assert!(f.exists(), "{} is kept", f.display());
    }
    // The dataset is whole and usable.
    assert_eq!(b.get_json(&format!("/v1/datasets/{ds}")).await["rows"], 6);
    b.assert_up().await;
}

#[tokio::test]
async fn with_a_shared_store_a_restart_removes_only_old_temporaries() {
    // The data directory is a working copy: rows are not checked against it, but a download
    // the process died in the middle of is removed once old.
    let shared = tempfile::tempdir().unwrap();
    let url = format!("file://{}", shared.path().display());
    let a = spawn().arg("--artifact-store", &url).start().await;
    let data = a.data_dir();
    let dir = a.dir.clone();
    let old_part = data.join("datasets").join(".0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b.jsonl.1234.part");
    std::fs::write(&old_part, b"half").unwrap();
    age(&old_part, Duration::from_secs(3600));
    let young_part = data.join("datasets").join(".0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c.jsonl.5678.part");
    std::fs::write(&young_part, b"half").unwrap();
    let no_row = data.join("datasets").join("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5d.jsonl");
    std::fs::write(&no_row, b"{}\n").unwrap();
    age(&no_row, Duration::from_secs(3600));
    a.shutdown().await;

    let b = spawn().in_dir(dir).arg("--artifact-store", &url).start().await;
    assert!(!old_part.exists(), "an old download temporary is removed");
    assert!(young_part.exists(), "a young one may be another process's download");
    assert!(no_row.exists(), "a working copy's files are not checked against rows");
    b.assert_up().await;
}
