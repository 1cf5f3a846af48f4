//! What a worker advertises: the kind of its device (from `--device`) and the memory it offers
//! a job, detected unless given: for cpu the RAM (`/proc/meminfo`, capped by a cgroup memory
//! limit, as in a container), for cuda the GPU's total memory as `nvidia-smi` reports it.

use crate::store::WorkerDevice;

const GIB: f64 = (1u64 << 30) as f64;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?}: use cpu, cuda or cuda:N")]
    Unknown(String),
    #[error("device memory must be a positive number of GB, got {0}")]
    Memory(f64),
}

/// The device `--device` names, with `memory_gb` if given, else the detected memory (None when
/// it cannot be found out; such a worker claims no job that requires an amount).
pub fn advertised(device: &str, memory_gb: Option<f64>) -> Result<WorkerDevice, DeviceError> {
    let name = device.trim().to_ascii_lowercase();
    let (kind, index) = match name.split_once(':') {
        None if name == "cpu" => ("cpu", None),
        None if name == "cuda" => ("cuda", Some(0)),
        Some(("cuda", n)) => ("cuda", Some(n.parse::<u32>().map_err(|_| DeviceError::Unknown(device.to_string()))?)),
        _ => return Err(DeviceError::Unknown(device.to_string())),
    };
    let memory_bytes = match memory_gb {
        Some(gb) if gb.is_finite() && gb > 0.0 => Some((gb * GIB) as i64),
        Some(gb) => return Err(DeviceError::Memory(gb)),
        None => match index {
            None => host_memory_bytes(),
            Some(i) => cuda_memory_bytes(i),
        },
    };
    Ok(WorkerDevice { kind: kind.to_string(), name, memory_bytes })
}

/// Total RAM, or the cgroup v2 / v1 memory limit when that is lower.
fn host_memory_bytes() -> Option<i64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let total_kib: i64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let total = total_kib * 1024;
    let limit = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .find_map(|s| s.trim().parse::<i64>().ok());
    Some(limit.map_or(total, |l| l.min(total)))
}

/// Total memory of GPU `index` in bytes, from `nvidia-smi` (MiB).
fn cuda_memory_bytes(index: u32) -> Option<i64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", &index.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mib: i64 = String::from_utf8_lossy(&out.stdout).lines().next()?.trim().parse().ok()?;
    Some(mib * 1024 * 1024)
}

/// Bytes as GB with one decimal, for messages.
pub fn gb(bytes: i64) -> String {
    format!("{:.1} GB", bytes as f64 / GIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_and_memory() {
        let cpu = advertised("cpu", None).unwrap();
        assert_eq!((cpu.kind.as_str(), cpu.name.as_str()), ("cpu", "cpu"));
        assert!(cpu.memory_bytes.unwrap() > 0, "RAM detected on Linux");
        let gpu = advertised("cuda:1", Some(80.0)).unwrap();
        assert_eq!((gpu.kind.as_str(), gpu.name.as_str(), gpu.memory_bytes), ("cuda", "cuda:1", Some(80 << 30)));
        assert_eq!(advertised("CUDA", Some(1.5)).unwrap().memory_bytes, Some(3 << 29));
        assert!(matches!(advertised("tpu", None), Err(DeviceError::Unknown(_))));
        assert!(matches!(advertised("cuda:x", None), Err(DeviceError::Unknown(_))));
        assert!(matches!(advertised("cpu", Some(0.0)), Err(DeviceError::Memory(_))));
        assert_eq!(gb(3 << 29), "1.5 GB");
    }
}
