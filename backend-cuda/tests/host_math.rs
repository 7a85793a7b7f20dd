//! The CUDA C mirror of the portable math (`kernels/math.cu`), compiled as host C++ with
//! contraction off, must equal `moe_router_core::math` bit for bit. Needs a C++ compiler (`c++`);
//! without one the test prints that it was skipped.

use moe_router_core::math;
use std::io::Write;
use std::process::{Command, Stdio};

fn inputs() -> Vec<(f32, f32)> {
    let mut v = Vec::new();
    let specials = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        0.5,
        2.0,
        1e-40,
        -1e-40,
        1e-38,
        1e-30,
        30.0,
        -30.0,
        -30.5,
        40.0,
        88.0,
        88.8,
        -87.0,
        -87.4,
        -100.0,
        100.0,
        1e30,
        -1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE,
        3.0,
        3.001,
        1.5e-8,
        -1.5e-8,
        1e-9,
        7.0,
        1e20,
        1e-20,
    ];
    for &a in &specials {
        for &b in &specials {
            v.push((a, b));
        }
    }
    let mut s: u64 = 0x1234_5678_9abc_def0;
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 32) as u32
    };
    for i in 0..400_000 {
        let (a, b) = match i % 4 {
            0 => (f32::from_bits(next()), f32::from_bits(next())),
            1 => (
                (next() as f32 / u32::MAX as f32 - 0.5) * 200.0,
                (next() as f32 / u32::MAX as f32) * 4.0,
            ),
            2 => (
                (next() as f32 / u32::MAX as f32 - 0.5) * 20.0,
                (next() as f32 / u32::MAX as f32 - 0.5) * 1e3,
            ),
            _ => (
                f32::from_bits(next() & 0x80ff_ffff),
                f32::from_bits(next() | 0x3f00_0000),
            ),
        };
        v.push((a, b));
    }
    v
}

/// Compiles `host_math_main.cpp` into a fresh directory (`None`: no C++ compiler, reported as a
/// skip); the directory is the caller's to remove.
fn compile(tag: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let dir = std::env::temp_dir().join(format!("moe-router-cuda-math-{tag}-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let exe = dir.join("host_math");
    let here = concat!(env!("CARGO_MANIFEST_DIR"), "/tests");
    let cc = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let status = Command::new(&cc)
        .args(["-O2", "-ffp-contract=off", "-fno-fast-math", "-std=c++17", "-o"])
        .arg(&exe)
        .arg(format!("{here}/host_math_main.cpp"))
        .status();
    match status {
        Ok(s) if s.success() => Some((dir, exe)),
        Ok(s) => panic!("compiling kernels/math.cu as C++ failed: {s}"),
        Err(e) => {
            eprintln!("skipped: no C++ compiler ({cc}): {e}");
            None
        }
    }
}

/// Runs `exe args` with the pairs on stdin; its stdout.
fn run(exe: &std::path::Path, args: &[&str], ins: &[(f32, f32)]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(ins.len() * 8);
    for &(a, b) in ins {
        bytes.extend_from_slice(&a.to_le_bytes());
        bytes.extend_from_slice(&b.to_le_bytes());
    }
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&bytes));
    let out = child.wait_with_output().expect("output");
    writer.join().expect("writer").expect("write");
    assert!(out.status.success(), "{exe:?} {args:?} failed: {}", out.status);
    out.stdout
}

#[test]
fn cuda_math_mirror_equals_core_math() {
    let Some((dir, exe)) = compile("mirror") else { return };
    let ins = inputs();
    let stdout = run(&exe, &[], &ins);
    assert_eq!(stdout.len(), ins.len() * 24);
    let names = ["exp", "div", "ln", "sqrt", "sigmoid", "sqrt_softplus"];
    let mut bad = 0;
    for (i, &(a, b)) in ins.iter().enumerate() {
        let want = [
            math::exp(a),
            math::div(a, b),
            math::ln(a.abs()),
            math::sqrt(a.abs()),
            math::sigmoid(a),
            math::sqrt_softplus(a),
        ];
        for (j, w) in want.iter().enumerate() {
            let o = (i * 6 + j) * 4;
            let got = u32::from_le_bytes(stdout[o..o + 4].try_into().expect("4 bytes"));
            let same = got == w.to_bits() || (w.is_nan() && f32::from_bits(got).is_nan());
            if !same {
                bad += 1;
                if bad < 10 {
                    eprintln!(
                        "{}({a:e}, {b:e}): core {:#x} cuda mirror {got:#x}",
                        names[j],
                        w.to_bits()
                    );
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(bad, 0, "{bad} results differ");
}

/// The bounded forms the rows backward kernel uses for the softmax after top-K (`p_exp_bounded`:
/// x not NaN, at most the overflow bound; `p_div_by_pos`: a finite with its sign bit clear, a
/// positive normal divisor) give the general forms' bits on their domains: exp on every 7th
/// bit pattern and every pattern near the cases' edges, division on the mirror's pairs that
/// fall in the domain and on softmax-like pairs (e_j in [0, 1], sum in [1, 16]).
#[test]
fn bounded_exp_and_division_equal_the_general_forms_on_their_domains() {
    let Some((dir, exe)) = compile("bounded") else { return };
    let mut ins = inputs();
    let mut s: u64 = 0x0bad_5eed_0000_0001;
    let mut unit = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    for i in 0..400_000 {
        let a = if i % 8 == 0 { unit() * 1e-37 } else { unit() };
        ins.push((a, 1.0 + 15.0 * unit()));
    }
    let stdout = String::from_utf8(run(&exe, &["bounded"], &ins)).expect("utf-8");
    let _ = std::fs::remove_dir_all(&dir);
    let last = stdout.lines().last().expect("a summary line");
    let words: Vec<&str> = last.split_whitespace().collect();
    assert_eq!(words.len(), 4, "unexpected output: {stdout}");
    let checked: u64 = words[1].parse().expect("count");
    let mismatched: u64 = words[3].parse().expect("count");
    assert!(checked > 450_000_000, "only {checked} cases checked");
    assert_eq!(mismatched, 0, "{stdout}");
}
