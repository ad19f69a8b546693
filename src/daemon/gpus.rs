//! The daemon's GPUs: which exist, which are handed out, and what a worker given none sees.
//!
//! `--gpus auto` reads the node's NVIDIA devices (`nvidia-smi -L`, else
//! `/proc/driver/nvidia/gpus`), and is an empty set where there are none. A worker asking
//! for `num_gpus` gets that many free ids, exclusively, until it exits; explicit `gpus`
//! are the scheduler's decision and are used as given (they must exist), and count as busy
//! so no count-based request is handed one of them meanwhile.

use std::collections::BTreeSet;

/// Whether a worker given no GPUs sees `CUDA_VISIBLE_DEVICES=""` or the daemon's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ZeroGpus {
    #[default]
    Hide,
    Inherit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSpec {
    Auto,
    None,
    Ids(Vec<u32>),
}

impl std::str::FromStr for GpuSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(GpuSpec::Auto),
            "none" | "" => Ok(GpuSpec::None),
            list => list
                .split(',')
                .map(|id| {
                    id.trim()
                        .parse::<u32>()
                        .map_err(|_| format!("expected auto, none or ids like 0,1; got {s:?}"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(GpuSpec::Ids),
        }
    }
}

/// The node's NVIDIA GPU ids, in the order nvidia-smi numbers them.
pub fn detect() -> Vec<u32> {
    if let Ok(out) = std::process::Command::new("nvidia-smi").arg("-L").output()
        && out.status.success()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        return text
            .lines()
            .filter_map(|line| line.strip_prefix("GPU ")?.split(':').next()?.trim().parse().ok())
            .collect();
    }
    match std::fs::read_dir("/proc/driver/nvidia/gpus") {
        Ok(entries) => (0..entries.count() as u32).collect(),
        Err(_) => Vec::new(),
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GpuError {
    #[error("gpus: {id} is not one of this node's GPUs ({all})")]
    Unknown { id: u32, all: String },
    #[error(
        "num_gpus: {wanted} requested but only {free} of {total} GPUs are free; retry when a worker exits"
    )]
    Exhausted {
        wanted: usize,
        free: usize,
        total: usize,
    },
    #[error("gpus: {id} is in use by another worker; retry when it exits")]
    Busy { id: u32 },
}

#[derive(Debug)]
pub struct GpuPool {
    all: BTreeSet<u32>,
    busy: Vec<u32>,
}

impl GpuPool {
    pub fn new(spec: &GpuSpec) -> GpuPool {
        let all = match spec {
            GpuSpec::Auto => detect().into_iter().collect(),
            GpuSpec::None => BTreeSet::new(),
            GpuSpec::Ids(ids) => ids.iter().copied().collect(),
        };
        GpuPool {
            all,
            busy: Vec::new(),
        }
    }

    pub fn all(&self) -> Vec<u32> {
        self.all.iter().copied().collect()
    }

    pub fn free(&self) -> Vec<u32> {
        self.all
            .iter()
            .copied()
            .filter(|id| !self.busy.contains(id))
            .collect()
    }

    /// Marks explicit ids busy (they must exist and be free).
    pub fn take_explicit(&mut self, ids: &[u32]) -> Result<Vec<u32>, GpuError> {
        if let Some(&id) = ids.iter().find(|id| !self.all.contains(id)) {
            let all = self.all.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            return Err(GpuError::Unknown {
                id,
                all: if all.is_empty() { "none".into() } else { all },
            });
        }
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        // Another worker's GPU is not lent by naming it.
        if let Some(&id) = ids.iter().find(|id| self.busy.contains(id)) {
            return Err(GpuError::Busy { id });
        }
        self.busy.extend(&ids);
        Ok(ids)
    }

    /// Allocates `n` free ids, lowest first, or fails without taking any.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>, GpuError> {
        let free = self.free();
        if free.len() < n {
            return Err(GpuError::Exhausted {
                wanted: n,
                free: free.len(),
                total: self.all.len(),
            });
        }
        let ids = free[..n].to_vec();
        self.busy.extend(&ids);
        Ok(ids)
    }

    /// Marks ids busy whatever they are (the GPUs of a worker a previous daemon started:
    /// in use until it is gone, even if the node's set has changed since).
    pub fn mark_busy(&mut self, ids: &[u32]) {
        self.busy.extend(ids);
    }

    /// Gives back what a worker held (one entry per hold, so overlapping explicit holds
    /// of one id each release their own).
    pub fn release(&mut self, ids: &[u32]) {
        for id in ids {
            if let Some(at) = self.busy.iter().position(|b| b == id) {
                self.busy.swap_remove(at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_exclusive_and_released() {
        let mut pool = GpuPool::new(&"0,1,2,3".parse().unwrap());
        let a = pool.allocate(2).unwrap();
        let b = pool.allocate(2).unwrap();
        assert_eq!((a.clone(), b.clone()), (vec![0, 1], vec![2, 3]));
        assert_eq!(
            pool.allocate(1),
            Err(GpuError::Exhausted {
                wanted: 1,
                free: 0,
                total: 4
            })
        );
        pool.release(&a);
        assert_eq!(pool.allocate(1).unwrap(), vec![0]);
        assert!(matches!(
            pool.take_explicit(&[7]),
            Err(GpuError::Unknown { id: 7, .. })
        ));
        assert_eq!(pool.take_explicit(&[1, 1]).unwrap(), vec![1]);
        assert!(pool.allocate(1).is_err(), "explicit ids count as busy");
        assert!("0,x".parse::<GpuSpec>().is_err());
    }
}
