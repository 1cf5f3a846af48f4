//! A scripted stand-in for the real trainer: steps on a timer, writes checkpoint and adapter
//! directories, honours `should_stop` and `resume_from`, and records what it was asked (in
//! memory, and optionally as lines appended to a journal file shared by several processes).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use arbiter::jobs::trainer::{EvalMetrics, TrainError, TrainObserver, TrainOutcome, TrainRequest, Trainer};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct Seen {
    pub job_id: String,
    pub attempt: i64,
    pub resume_from: Option<PathBuf>,
    pub train_rows: usize,
    pub validation_rows: usize,
}

pub struct ScriptedTrainer {
    pub steps: u64,
    pub step_delay: Duration,
    pub checkpoint_every: u64,
    /// Fail with this message instead of finishing.
    pub fail_with: Option<String>,
    /// As the real trainer keeps the best checkpoint: checkpoints from this step on record it as
    /// the best (`"best": [step, metrics]` in `state.json`), and the run fails at the end unless
    /// its directory holds that checkpoint.
    pub best_at: Option<u64>,
    pub seen: Mutex<Vec<Seen>>,
    /// A file and a label: appends `start LABEL JOB ATTEMPT RESUME_STEP` when a run starts and
    /// `done LABEL JOB ATTEMPT` when it finishes (one `write` per line, `O_APPEND`).
    pub journal: Option<(PathBuf, String)>,
}

impl ScriptedTrainer {
    pub fn new(steps: u64, step_delay: Duration) -> ScriptedTrainer {
        ScriptedTrainer {
            steps,
            step_delay,
            checkpoint_every: 2,
            fail_with: None,
            best_at: None,
            seen: Mutex::new(Vec::new()),
            journal: None,
        }
    }

    fn journal(&self, line: String) -> Result<(), TrainError> {
        let Some((path, _)) = &self.journal else { return Ok(()) };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| TrainError::Failed(e.to_string()))?;
        f.write_all(format!("{line}\n").as_bytes()).map_err(|e| TrainError::Failed(e.to_string()))
    }

    fn label(&self) -> &str {
        self.journal.as_ref().map(|(_, l)| l.as_str()).unwrap_or("")
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

fn step_of(dir: &std::path::Path) -> Option<u64> {
    dir.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()
}

impl Trainer for ScriptedTrainer {
    fn train(&self, req: TrainRequest, obs: &dyn TrainObserver) -> Result<TrainOutcome, TrainError> {
        self.seen.lock().expect("lock").push(Seen {
            job_id: req.job_id.clone(),
            attempt: req.attempt,
            resume_from: req.resume_from.clone(),
            train_rows: req.train_rows.len(),
            validation_rows: req.validation_rows.len(),
        });
        // as the real trainer reads its checkpoint back: a state that does not parse is unusable
        // (a directory without one, as some tests make, resumes by its name)
        if let Some(Ok(state)) = req.resume_from.as_ref().map(|d| std::fs::read(d.join("state.json"))) {
            if let Err(e) = serde_json::from_slice::<serde_json::Value>(&state) {
                return Err(TrainError::UnusableCheckpoint(format!("its state: {e}")));
            }
        }
        let start = req.resume_from.as_deref().and_then(step_of).unwrap_or(0);
        self.journal(format!("start {} {} {} {start}", self.label(), req.job_id, req.attempt))?;
        obs.on_log(&format!("scripted trainer: {} rows, starting after step {start}", req.train_rows.len()));
        for step in start + 1..=self.steps {
            if obs.should_stop() {
                return Err(TrainError::Stopped);
            }
            std::thread::sleep(self.step_delay);
            let loss = 1.1 / (step as f64).sqrt();
            obs.on_step(step, self.steps, step as f64 / self.steps as f64, loss, 1e-4);
            if self.checkpoint_every > 0 && step % self.checkpoint_every == 0 {
                let dir = req.work_dir.join("checkpoints").join(format!("step-{step}"));
                std::fs::create_dir_all(&dir).map_err(|e| TrainError::Failed(e.to_string()))?;
                let mut state = json!({ "step": step });
                if let Some(best) = self.best_at.filter(|b| *b <= step) {
                    state["best"] = json!([best, { "log_loss": 0.5 }]);
                }
                std::fs::write(dir.join("state.json"), state.to_string()).map_err(|e| TrainError::Failed(e.to_string()))?;
                let m = EvalMetrics { log_loss: loss, accuracy: 0.5, balanced_accuracy: 0.45, rows: req.validation_rows.len() };
                obs.on_eval(step, &m);
                obs.on_checkpoint(step, &dir, Some(&m));
            }
        }
        if let Some(msg) = &self.fail_with {
            return Err(TrainError::Failed(msg.clone()));
        }
        if let Some(best) = self.best_at {
            let dir = req.work_dir.join("checkpoints").join(format!("step-{best}"));
            if !dir.join("state.json").is_file() {
                return Err(TrainError::Failed(format!("the best checkpoint is not in {}", dir.display())));
            }
        }
        let adapter = req.work_dir.join("adapter");
        std::fs::create_dir_all(&adapter).map_err(|e| TrainError::Failed(e.to_string()))?;
        std::fs::write(adapter.join("adapter_config.json"), "{\"peft_type\":\"LORA\"}")
            .map_err(|e| TrainError::Failed(e.to_string()))?;
        self.journal(format!("done {} {} {}", self.label(), req.job_id, req.attempt))?;
        Ok(TrainOutcome { adapter_dir: adapter, metrics: json!({ "log_loss": 0.9, "steps": self.steps }) })
    }
}
