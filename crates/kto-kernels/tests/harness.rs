//! The emulation harness catches the bugs it exists for: a missing barrier, an off-by-one, a warp race, divergent
//! barriers and shuffles, an access past a buffer, a launch that does not match the kernel's parameters. Each
//! broken kernel in `emulation/harness.cu` has a correct twin that passes the same check.

use candle_core::{DType, Result};
use kto_kernels::emulation::harness::*;
use kto_kernels::emulation::{run, GuardedBuffer, Order};
use kto_kernels::kernel::{Arg, Kernel, Launch};
use kto_kernels::testing::{assert_close, Normal, Tolerance};

/// Σx and Σx² of each row, in f64 then rounded.
fn two_sums_twin(x: &[f32], dim: usize) -> Vec<f32> {
    x.chunks(dim)
        .flat_map(|row| {
            let s: f64 = row.iter().map(|&v| v as f64).sum();
            let q: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
            [s as f32, q as f32]
        })
        .collect()
}

/// Runs a two-sums kernel on `rows` rows of `dim` in `order` and compares it with the twin.
fn check_two_sums(kernel: &'static Kernel, rows: usize, dim: usize, order: Order) -> Result<()> {
    let x = Normal::new(1).vec(rows * dim, 1.0);
    let xb = GuardedBuffer::from_slice(&x);
    let out = GuardedBuffer::filled(2 * rows, f32::NAN);
    let args = vec![xb.arg(), out.arg(), Arg::I32(dim as i32)];
    run(
        &Launch::new(
            kernel,
            DType::F32,
            [rows as u32, 1, 1],
            [128, 1, 1],
            0,
            args,
        )?,
        order,
    )?;
    out.check()?;
    assert_close(
        kernel.name,
        out.as_slice(),
        &two_sums_twin(&x, dim),
        Tolerance {
            rel: 1e-5,
            abs: 1e-4,
        },
    )
}

#[test]
fn correct_reductions_pass_in_both_orders() -> Result<()> {
    for order in Order::BOTH {
        check_two_sums(&TWO_SUMS, 3, 300, order)?;
    }
    Ok(())
}

/// Static shared memory is the block's own: poisoned at each block start, so a value written by another block (or
/// left by an earlier launch) never shows through, in either order.
#[test]
fn static_shared_memory_is_poisoned_at_each_block_start() -> Result<()> {
    for order in Order::BOTH {
        for _launch in 0..2 {
            let out = GuardedBuffer::filled(3, 0f32);
            let launch = Launch::new(
                &SHARED_FROM_ANOTHER_BLOCK,
                DType::F32,
                [3, 1, 1],
                [64, 1, 1],
                0,
                vec![out.arg()],
            )?;
            run(&launch, order)?;
            let got = out.to_vec();
            assert_eq!(got[0], 7.0, "{order:?}: block 0 reads its own write");
            assert!(
                got[1].is_nan() && got[2].is_nan(),
                "{order:?}: blocks 1 and 2 read {:?} instead of the poison",
                &got[1..]
            );
        }
    }
    Ok(())
}

#[test]
fn a_missing_barrier_is_caught() {
    let failures = Order::BOTH
        .iter()
        .filter(|&&order| check_two_sums(&TWO_SUMS_MISSING_BARRIER, 3, 300, order).is_err())
        .count();
    assert!(
        failures > 0,
        "the missing barrier went unnoticed in both orders"
    );
}

#[test]
fn an_off_by_one_is_caught() {
    // Rows 0..3 of a 4-row buffer: each reads its neighbour's first element, and the read stays mapped (past the
    // end of the buffer it faults instead: `a_read_past_the_end_faults`).
    let x = Normal::new(2).vec(4 * 100, 1.0);
    let xb = GuardedBuffer::from_slice(&x);
    let out = GuardedBuffer::filled(6, f32::NAN);
    let args = vec![xb.arg(), out.arg(), Arg::I32(100)];
    let launch = Launch::new(
        &TWO_SUMS_OFF_BY_ONE,
        DType::F32,
        [3, 1, 1],
        [64, 1, 1],
        0,
        args,
    )
    .unwrap();
    run(&launch, Order::Ascending).unwrap();
    let want = two_sums_twin(&x[..300], 100);
    assert!(
        assert_close(
            "off by one",
            out.as_slice(),
            &want,
            Tolerance {
                rel: 1e-5,
                abs: 1e-4
            }
        )
        .is_err(),
        "the off-by-one read went unnoticed"
    );
}

#[test]
fn a_read_past_the_end_faults() {
    // Run the faulting launch in a child process: the guard page after the buffer turns the read into SIGSEGV.
    if std::env::var_os("KTO_HARNESS_CHILD").is_some() {
        let _ = check_two_sums(&TWO_SUMS_OFF_BY_ONE, 2, 256, Order::Ascending);
        std::process::exit(0); // not reached when the guard page works
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_read_past_the_end_faults", "--nocapture"])
        .env("KTO_HARNESS_CHILD", "1")
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(11),
        "expected SIGSEGV from the guard page, got {status:?}"
    );
}

fn neighbour_swap(sync: bool, order: Order) -> Result<Vec<f32>> {
    let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let xb = GuardedBuffer::from_slice(&x);
    let out = GuardedBuffer::filled(64, f32::NAN);
    let args = vec![xb.arg(), out.arg(), Arg::I32(sync as i32)];
    run(
        &Launch::new(
            &NEIGHBOUR_SWAP,
            DType::F32,
            [1, 1, 1],
            [64, 1, 1],
            256,
            args,
        )?,
        order,
    )?;
    Ok(out.to_vec())
}

#[test]
fn a_warp_race_is_caught_and_syncwarp_fixes_it() -> Result<()> {
    let want: Vec<f32> = (0..64u32).map(|i| (i ^ 1) as f32).collect();
    for order in Order::BOTH {
        assert_close(
            "with __syncwarp",
            &neighbour_swap(true, order)?,
            &want,
            Tolerance { rel: 0.0, abs: 0.0 },
        )?;
    }
    let caught = Order::BOTH
        .iter()
        .any(|&order| neighbour_swap(false, order).unwrap() != want);
    assert!(caught, "the race between lanes went unnoticed");
    Ok(())
}

fn launch_error(kernel: &'static Kernel, threads: u32) -> String {
    let out = GuardedBuffer::filled(threads as usize, 0f32);
    let launch = Launch::new(
        kernel,
        DType::F32,
        [1, 1, 1],
        [threads, 1, 1],
        0,
        vec![out.arg()],
    )
    .unwrap();
    match run(&launch, Order::Ascending) {
        Ok(()) => panic!("{} ran without an error", kernel.name),
        Err(e) => e.to_string(),
    }
}

#[test]
fn divergence_is_reported_not_hung() {
    let exited = launch_error(&DIVERGENT_BARRIER, 64);
    assert!(
        exited.contains("exited while 32 wait at the __syncthreads at harness.cu"),
        "{exited}"
    );
    let split = launch_error(&SPLIT_BARRIER, 64);
    assert!(split.contains("divergent __syncthreads"), "{split}");
    let shuffle = launch_error(&SHUFFLE_AFTER_EXIT, 32);
    assert!(
        shuffle.contains("exited before the warp exchange"),
        "{shuffle}"
    );
}

#[test]
fn a_launch_must_match_the_kernel_signature() {
    let x = GuardedBuffer::filled(4, 1f32);
    let out = GuardedBuffer::filled(2, 0f32);
    let launch = Launch::new(
        &MISDECLARED,
        DType::F32,
        [1, 1, 1],
        [32, 1, 1],
        0,
        vec![x.arg(), out.arg(), Arg::F32(4.0)],
    )
    .unwrap();
    let err = run(&launch, Order::Ascending).unwrap_err().to_string();
    assert!(
        err.contains("the C++ kernel takes parameters of kinds [0, 0, 1]"),
        "{err}"
    );
    // and the declaration itself rejects arguments of the wrong kind before anything runs
    let wrong = Launch::new(
        &TWO_SUMS,
        DType::F32,
        [1, 1, 1],
        [32, 1, 1],
        0,
        vec![x.arg(), out.arg(), Arg::F32(4.0)],
    );
    assert!(wrong
        .unwrap_err()
        .to_string()
        .contains("argument `dim` is F32, the kernel takes I32"));
}
