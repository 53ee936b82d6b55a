//! Which processes train this run: alone, or the MPI world that `mpirun -n N kto train` (or `srun`) started, when
//! kto is built with the `mpi` feature. A kto without it refuses to run as one of several launched processes,
//! rather than have N independent runs write one folder.
use anyhow::{bail, Context, Result};
use kto_trainer::run_dir::Start;
use kto_trainer::world::{launched_processes, Alone, Counted, World};

/// The world this process trains in.
pub fn join() -> Result<Box<dyn World>> {
    let launched = launched_processes().filter(|(n, _)| *n > 1);
    #[cfg(feature = "mpi")]
    if launched.is_some() {
        let world = kto_trainer::world::mpi_world::MpiWorld::join()?;
        tracing::info!(
            "rank {} of {} (MPI)",
            world.shard().rank,
            world.shard().world_size
        );
        // Gradients on a GPU are summed by NCCL (its communicator is made at the first such sum); on the CPU, MPI.
        #[cfg(feature = "nccl")]
        let world = kto_trainer::nccl::NcclWorld::over(Box::new(world));
        return Ok(Box::new(world));
    }
    if let Some((n, var)) = launched {
        bail!(
            "started as one of {n} processes ({var}={n}), but this kto was built without the `mpi` feature: each \
             process would train alone and all would write the same output_dir. Build with `cargo build --release \
             -p kto-cli --features mpi` (needs an MPI library, e.g. Debian's libopenmpi-dev), or start one process"
        );
    }
    Ok(Box::new(Alone))
}

/// Every rank's `result`, agreed: Ok on every rank only when it is Ok on all of them, so that no rank goes on into
/// the training collectives while another has stopped. A rank whose own result failed returns its error; the
/// others say that another rank failed (its error is on that rank's stderr).
pub fn all_ok<T>(world: &dyn World, result: Result<T>) -> Result<T> {
    if world.size() == 1 {
        return result;
    }
    let mut failed = [result.is_err() as u8 as f64];
    world.sum_f64(&mut failed, Counted::All)?;
    match result {
        Err(err) => Err(err),
        Ok(_) if failed[0] > 0.0 => bail!(
            "{} of {} ranks could not start (see their errors)",
            failed[0],
            world.size()
        ),
        Ok(value) => Ok(value),
    }
}

/// Rank 0's `start` on every rank: the other ranks continue from the checkpoint rank 0 chose (read from the same
/// path: resuming a data-parallel run needs `output_dir` on a file system every rank sees, as transformers' does).
pub fn shared_start(world: &dyn World, start: Start) -> Result<Start> {
    if world.size() == 1 {
        return Ok(start);
    }
    let mut checkpoint = start
        .checkpoint()
        .map(|dir| dir.as_os_str().as_encoded_bytes().to_vec())
        .unwrap_or_default();
    world.broadcast_bytes(&mut checkpoint)?;
    Ok(match (world.is_main(), checkpoint.is_empty()) {
        (true, _) | (false, true) => start,
        (false, false) => Start::Resume(std::path::PathBuf::from(
            String::from_utf8(checkpoint)
                .context("the checkpoint path rank 0 sent is not UTF-8")?,
        )),
    })
}
