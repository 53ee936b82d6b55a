//! Which processes train this run: alone, or the MPI world that `mpirun -n N kto train` (or `srun`) started, when
//! kto is built with the `mpi` feature. A kto without it refuses to run as one of several launched processes,
//! rather than have N independent runs write one folder.
use anyhow::{bail, Result};
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
