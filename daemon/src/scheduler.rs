//! Scheduling decisions, free of I/O: which queued job runs next, and where.
use lorad_schema::{JobId, JobRecord, JobState};

/// Queued jobs in the order they start: highest priority first, then jobs put back by recovery (they
/// were already running), then the oldest (lowest id). A job whose owner already has
/// `max_running_per_user` jobs initializing or running is left out: it waits; so does a job whose
/// prerequisites have not completed or whose start time is ahead (`queue::may_start` at `now_ms`).
fn queue<'a>(
    jobs: &[&'a JobRecord],
    max_running_per_user: usize,
    now_ms: u64,
) -> Vec<&'a JobRecord> {
    let states = crate::queue::states(jobs.iter().copied());
    let mut running: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for j in jobs {
        if matches!(j.state, JobState::Initializing | JobState::Running) {
            *running.entry(j.owner_uid).or_insert(0) += 1;
        }
    }
    let mut queued: Vec<&JobRecord> = jobs
        .iter()
        .copied()
        .filter(|j| crate::queue::may_start(j, &states, now_ms))
        .filter(|j| running.get(&j.owner_uid).copied().unwrap_or(0) < max_running_per_user)
        .collect();
    queued.sort_by_key(|j| (std::cmp::Reverse(j.priority), !j.requeued, j.id));
    queued
}

/// The queued job to start next, whatever the devices (see [`next_start`] for where).
pub fn next_job<'a>(
    jobs: impl IntoIterator<Item = &'a JobRecord>,
    max_running_per_user: usize,
    now_ms: u64,
) -> Option<JobId> {
    let jobs: Vec<&JobRecord> = jobs.into_iter().collect();
    queue(&jobs, max_running_per_user, now_ms)
        .first()
        .map(|j| j.id)
}

/// Where a job runs: one of the CPU's slots, or a whole GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    /// One of `cpu_slots`.
    Cpu,
    /// GPU `N` (`cuda:N`), one job at a time.
    Gpu(u32),
    /// A Slurm job: the cluster schedules it, no device of this machine is held.
    Slurm,
}

impl Slot {
    /// The `device` setting the worker gets: `cpu` or `cuda:N`.
    pub fn device(&self) -> String {
        match self {
            Slot::Cpu => "cpu".into(),
            Slot::Gpu(n) => format!("cuda:{n}"),
            Slot::Slurm => "slurm".into(),
        }
    }
}

/// What the machine offers now.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    /// CPU slots in all (busy ones included).
    pub cpu_slots: usize,
    /// Memory available to a new CPU job, bytes; None: unknown, not checked.
    pub cpu_free: Option<u64>,
    /// The GPUs present, each with its free memory (None: unknown, not checked).
    pub gpus: Vec<(u32, Option<u64>)>,
    /// `device=auto` may run on the CPU when no GPU is free.
    pub auto_cpu: bool,
    /// The daemon's executor is Slurm: jobs with `executor=default` go to the cluster.
    pub slurm_default: bool,
}

/// Whether `job` runs as Slurm jobs: its `executor` setting, or the daemon's for `default`.
pub fn runs_on_slurm(job: &JobRecord, slurm_default: bool) -> bool {
    runs_on_slurm_with(job.settings.executor, slurm_default)
}

/// [`runs_on_slurm`] for an `executor` setting.
pub fn runs_on_slurm_with(executor: lorad_schema::ExecutorChoice, slurm_default: bool) -> bool {
    match executor {
        lorad_schema::ExecutorChoice::Slurm => true,
        lorad_schema::ExecutorChoice::Local => false,
        lorad_schema::ExecutorChoice::Default => slurm_default,
    }
}

/// The next job to start and its slot, given the slots `busy` now. Jobs go in queue order; each takes
/// the first free slot its `device` allows (`cpu`; `cuda:N`; `auto`: a free GPU, else the CPU if
/// `auto_cpu`) whose free memory holds the job's estimate. A job with no such slot waits without
/// holding back the jobs behind it that want other devices; a GPU that disappeared leaves its jobs
/// waiting. A job for Slurm needs no slot here: the cluster queues it.
pub fn next_start(
    jobs: &[JobRecord],
    busy: &[Slot],
    cap: &Capacity,
    max_running_per_user: usize,
    now_ms: u64,
) -> Option<(JobId, Slot)> {
    let refs: Vec<&JobRecord> = jobs.iter().collect();
    let cpu_busy = busy.iter().filter(|s| **s == Slot::Cpu).count();
    let fits = |free: Option<u64>, job: &JobRecord| match (free, job.memory_estimate) {
        (Some(free), Some(need)) => need <= free,
        _ => true,
    };
    let cpu = |job: &JobRecord| {
        (cpu_busy < cap.cpu_slots && fits(cap.cpu_free, job)).then_some(Slot::Cpu)
    };
    let gpu = |n: u32, job: &JobRecord| {
        cap.gpus
            .iter()
            .find(|(i, _)| *i == n)
            .filter(|(i, free)| !busy.contains(&Slot::Gpu(*i)) && fits(*free, job))
            .map(|(i, _)| Slot::Gpu(*i))
    };
    queue(&refs, max_running_per_user, now_ms)
        .into_iter()
        .find_map(|job| {
            if runs_on_slurm(job, cap.slurm_default) {
                return Some((job.id, Slot::Slurm));
            }
            let slot = match job.settings.device.as_str() {
                "cpu" => cpu(job),
                "auto" => cap
                    .gpus
                    .iter()
                    .find_map(|(n, _)| gpu(*n, job))
                    .or_else(|| cap.auto_cpu.then(|| cpu(job)).flatten()),
                "cuda" => gpu(0, job),
                other => other
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse().ok())
                    .and_then(|n| gpu(n, job)),
            };
            slot.map(|s| (job.id, s))
        })
}

/// How a worker ended, as the supervisor saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// The engine refused the job (bad data, bad model): the message.
    Refused(String),
    /// A disk was full.
    NoSpace {
        /// The full directory.
        dir: String,
        /// The write error.
        message: String,
    },
    /// The watchdog killed it: why.
    Stalled(String),
    /// It died on its own: how ("exited with code 101", "was killed by signal 9 (SIGKILL)").
    Crashed(String),
    /// It was stopped from outside (not by lorad) after writing a checkpoint: why.
    Interrupted(String),
}

/// What becomes of a job whose worker ended without finishing, with the reason to record.
#[derive(Debug, Clone, PartialEq)]
pub enum AfterExit {
    /// Paused: it resumes from its newest checkpoint when asked.
    Pause(String),
    /// Failed for good.
    Fail(String),
    /// Queued again at the front, one restart more.
    Restart(String),
    /// Queued again at the front, no restart counted: the attempt was interrupted from outside after
    /// a checkpoint (a Slurm time limit's pre-kill signal).
    Resume(String),
}

/// The decision after a worker of `job` ended: a full disk pauses (not the job's fault, nothing
/// incomplete kept); a refusal fails (a restart would fail the same way); a stall or a crash restarts
/// until `max_restarts`, then fails.
pub fn after_exit(job: &JobRecord, ending: Ending) -> AfterExit {
    let id = job.id;
    let max = job.settings.max_restarts;
    match ending {
        Ending::NoSpace { dir, message } => AfterExit::Pause(format!(
            "no space left on device in {dir}: free some space, then `loractl resume {id}` ({message})"
        )),
        Ending::Refused(message) => AfterExit::Fail(message),
        Ending::Stalled(cause) if job.progress.restarts < max => AfterExit::Restart(format!(
            "{cause}; restart {} of {max}",
            job.progress.restarts + 1
        )),
        Ending::Crashed(how) if job.progress.restarts < max => AfterExit::Restart(format!(
            "crashed: worker {how}; restart {} of {max}",
            job.progress.restarts + 1
        )),
        Ending::Stalled(cause) => AfterExit::Fail(format!("{cause}; gave up after {max} restarts")),
        Ending::Crashed(how) => {
            AfterExit::Fail(format!("worker {how}; gave up after {max} restarts"))
        }
        Ending::Interrupted(why) => {
            AfterExit::Resume(format!("{why}; resuming from its checkpoint"))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use lorad_schema::{Progress, TrainSettings};

    /// A job record with every field but these at a plain value.
    pub(crate) fn job(id: u64, state: JobState, priority: i32) -> JobRecord {
        JobRecord {
            id: JobId(id),
            name: format!("j{id}"),
            state,
            reason: None,
            owner_uid: 0,
            priority,
            template: "t".into(),
            base_model: "m".into(),
            dataset: "d".into(),
            output_dir: "o".into(),
            settings: TrainSettings::default(),
            overrides: Default::default(),
            progress: Progress::default(),
            created_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            adapter_dir: None,
            worker_pid: None,
            resume_checkpoint: None,
            requeued: false,
            memory_estimate: None,
            first_started_at_ms: None,
            after: Vec::new(),
            not_before_ms: None,
            on_finish: None,
        }
    }

    fn on(id: u64, device: &str, priority: i32, estimate: Option<u64>) -> JobRecord {
        let mut j = job(id, JobState::Queued, priority);
        j.settings.device = device.into();
        j.memory_estimate = estimate;
        j
    }

    fn cap(cpu_slots: usize, gpus: &[(u32, Option<u64>)]) -> Capacity {
        Capacity {
            cpu_slots,
            cpu_free: None,
            gpus: gpus.to_vec(),
            auto_cpu: true,
            slurm_default: false,
        }
    }

    #[test]
    fn slurm_jobs_need_no_slot_here() {
        let mut jobs = [on(1, "cpu", 0, Some(8 << 30)), on(2, "cpu", 0, None)];
        jobs[0].settings.executor = lorad_schema::ExecutorChoice::Slurm;
        let full = Capacity {
            cpu_free: Some(1 << 30),
            ..cap(1, &[])
        };
        // The CPU slot is busy and memory short, yet the Slurm job starts (the cluster queues it).
        assert_eq!(
            next_start(&jobs, &[Slot::Cpu], &full, 9, 0),
            Some((JobId(1), Slot::Slurm))
        );
        // With Slurm the daemon's executor, `default` jobs go there; `local` ones stay here.
        jobs[0].settings.executor = lorad_schema::ExecutorChoice::Local;
        let slurm = Capacity {
            slurm_default: true,
            ..full
        };
        assert_eq!(
            next_start(&jobs, &[Slot::Cpu], &slurm, 9, 0),
            Some((JobId(2), Slot::Slurm))
        );
    }

    #[test]
    fn one_job_per_gpu_and_several_gpus_at_once() {
        let jobs = [
            on(1, "auto", 0, None),
            on(2, "auto", 0, None),
            on(3, "auto", 0, None),
        ];
        let c = cap(0, &[(0, None), (1, None)]);
        assert_eq!(
            next_start(&jobs, &[], &c, 9, 0),
            Some((JobId(1), Slot::Gpu(0)))
        );
        // Job 1 started on GPU 0: job 2 takes GPU 1; with both busy and no CPU slot, job 3 waits.
        let mut jobs = jobs;
        jobs[0].state = JobState::Running;
        assert_eq!(
            next_start(&jobs, &[Slot::Gpu(0)], &c, 9, 0),
            Some((JobId(2), Slot::Gpu(1)))
        );
        jobs[1].state = JobState::Running;
        assert_eq!(
            next_start(&jobs, &[Slot::Gpu(0), Slot::Gpu(1)], &c, 9, 0),
            None
        );
        // With a CPU slot, auto falls back to it, unless that is not allowed.
        let c1 = cap(1, &[(0, None), (1, None)]);
        let busy = [Slot::Gpu(0), Slot::Gpu(1)];
        assert_eq!(
            next_start(&jobs, &busy, &c1, 9, 0),
            Some((JobId(3), Slot::Cpu))
        );
        let strict = Capacity {
            auto_cpu: false,
            ..c1
        };
        assert_eq!(next_start(&jobs, &busy, &strict, 9, 0), None);
    }

    #[test]
    fn a_named_gpu_is_waited_for_without_blocking_other_devices() {
        // Job 1 (highest priority) wants the busy GPU 0; job 2 wants the CPU: it goes first.
        let jobs = [
            on(1, "cuda:0", 9, None),
            on(2, "cpu", 0, None),
            on(3, "cuda:1", 0, None),
        ];
        let c = cap(1, &[(0, None), (1, None)]);
        assert_eq!(
            next_start(&jobs, &[Slot::Gpu(0)], &c, 9, 0),
            Some((JobId(2), Slot::Cpu))
        );
        // Priorities hold on a free device.
        assert_eq!(
            next_start(&jobs, &[], &c, 9, 0),
            Some((JobId(1), Slot::Gpu(0)))
        );
        // A GPU that disappeared (1): its job waits, the others go on.
        let gone = cap(0, &[(0, None)]);
        assert_eq!(next_start(&jobs, &[Slot::Gpu(0)], &gone, 9, 0), None);
        assert_eq!(next_start(&jobs[2..], &[], &gone, 9, 0), None);
    }

    #[test]
    fn cpu_slots_and_memory_gate_the_start() {
        let jobs = [
            on(1, "cpu", 0, Some(8 << 30)),
            on(2, "cpu", 0, Some(1 << 30)),
        ];
        let c = Capacity {
            cpu_free: Some(4 << 30),
            ..cap(2, &[])
        };
        // Job 1 needs 8 GiB of the 4 free: it waits, job 2 fits and starts.
        assert_eq!(
            next_start(&jobs, &[], &c, 9, 0),
            Some((JobId(2), Slot::Cpu))
        );
        // Two slots, one busy: one more CPU job; both busy: none.
        let small = [on(3, "cpu", 0, None), on(4, "cpu", 0, None)];
        assert_eq!(
            next_start(&small, &[Slot::Cpu], &c, 9, 0),
            Some((JobId(3), Slot::Cpu))
        );
        assert_eq!(next_start(&small, &[Slot::Cpu, Slot::Cpu], &c, 9, 0), None);
        // A GPU whose free memory is short keeps a big job waiting; a job that fits takes it.
        let g = cap(0, &[(0, Some(20 << 30))]);
        let big = [
            on(5, "cuda:0", 5, Some(31 << 30)),
            on(6, "auto", 0, Some(17 << 30)),
        ];
        assert_eq!(
            next_start(&big, &[], &g, 9, 0),
            Some((JobId(6), Slot::Gpu(0)))
        );
        assert_eq!(Slot::Gpu(3).device(), "cuda:3");
    }

    #[test]
    fn priority_then_age() {
        let jobs = [
            job(1, JobState::Queued, 0),
            job(2, JobState::Queued, 5),
            job(3, JobState::Queued, 5),
        ];
        assert_eq!(next_job(&jobs, 4, 0), Some(JobId(2)));
    }

    #[test]
    fn requeued_jobs_go_first_within_their_priority() {
        let mut back = job(9, JobState::Queued, 0);
        back.requeued = true;
        let jobs = [
            job(1, JobState::Queued, 0),
            back,
            job(3, JobState::Queued, 1),
        ];
        assert_eq!(next_job(&jobs, 4, 0), Some(JobId(3)));
        assert_eq!(next_job(&jobs[..2], 4, 0), Some(JobId(9)));
    }

    #[test]
    fn an_owner_at_the_running_limit_waits_and_others_go_first() {
        let mut mine = job(1, JobState::Running, 0);
        mine.owner_uid = 7;
        let mut next = job(2, JobState::Queued, 9);
        next.owner_uid = 7;
        let mut other = job(3, JobState::Queued, 0);
        other.owner_uid = 8;
        let jobs = [mine, next, other];
        assert_eq!(next_job(&jobs, 1, 0), Some(JobId(3)));
        assert_eq!(next_job(&jobs, 2, 0), Some(JobId(2)));
        assert_eq!(next_job(&jobs[..2], 1, 0), None);
    }

    #[test]
    fn after_exit_pauses_on_a_full_disk_fails_on_refusal_and_restarts_crashes_until_the_limit() {
        let mut j = job(3, JobState::Running, 0);
        j.settings.max_restarts = 2;
        let full = Ending::NoSpace {
            dir: "/var/lib/lorad/jobs/3".into(),
            message: "No space left on device (os error 28)".into(),
        };
        assert!(matches!(after_exit(&j, full),
            AfterExit::Pause(r) if r.starts_with("no space left on device in /var/lib/lorad/jobs/3") && r.contains("loractl resume 3")));
        assert_eq!(
            after_exit(&j, Ending::Refused("dataset line 4: not JSON".into())),
            AfterExit::Fail("dataset line 4: not JSON".into())
        );
        assert_eq!(
            after_exit(
                &j,
                Ending::Crashed("was killed by signal 9 (SIGKILL)".into())
            ),
            AfterExit::Restart(
                "crashed: worker was killed by signal 9 (SIGKILL); restart 1 of 2".into()
            )
        );
        assert_eq!(
            after_exit(
                &j,
                Ending::Stalled("stalled: no progress for 180 s while training".into())
            ),
            AfterExit::Restart(
                "stalled: no progress for 180 s while training; restart 1 of 2".into()
            )
        );
        j.progress.restarts = 2;
        assert_eq!(
            after_exit(&j, Ending::Crashed("exited with code 101".into())),
            AfterExit::Fail("worker exited with code 101; gave up after 2 restarts".into())
        );
        assert_eq!(
            after_exit(&j, Ending::Stalled("stalled: x".into())),
            AfterExit::Fail("stalled: x; gave up after 2 restarts".into())
        );
    }

    #[test]
    fn only_queued_jobs_run() {
        let jobs = [
            job(1, JobState::Completed, 9),
            job(2, JobState::Paused, 9),
            job(3, JobState::Running, 0),
        ];
        assert_eq!(next_job(&jobs, 4, 0), None);
    }
}
