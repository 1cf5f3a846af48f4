//! A token embedding table kept in host memory while the model runs on a GPU
//! (`Llama::embeddings_to_host`). On CUDA the table's memory is page-locked and mapped into the
//! device's address space, and one kernel (`kernels/embed.cu`) reads the looked-up rows over the
//! bus in stream order: the ids stay on the device, nothing waits for the host, and a captured
//! forward (a CUDA graph) replays the lookup like any other kernel. Where the memory cannot be
//! mapped, the rows are looked up on the host and copied. The same kernel gathers the rows of
//! a table held on the device (`device_rows`), 16 bytes at a time.

#[cfg(feature = "cuda")]
use candle_core::DType;
use candle_core::{Device, Result, Tensor};

/// A `[vocab, hidden]` table in host memory, mapped for a device when it could be.
pub struct HostTable {
    /// Declared first, so it is dropped (unregistered) before the memory it maps.
    #[cfg(feature = "cuda")]
    mapped: Option<Mapped>,
    /// The table, on the CPU, contiguous; the mapping reads its memory.
    table: Tensor,
}

impl HostTable {
    /// `table`'s copy in host memory, mapped for `device` when that is a GPU (bf16 or f16).
    pub fn new(table: &Tensor, device: &Device) -> Result<HostTable> {
        let table = table.to_device(&Device::Cpu)?.contiguous()?;
        #[cfg(feature = "cuda")]
        let mapped = match device {
            Device::Cuda(dev) => match Mapped::new(&table, dev) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(error = %e, "embedding table: host memory not mapped; rows are copied per forward");
                    None
                }
            },
            _ => None,
        };
        let _ = device;
        Ok(HostTable {
            #[cfg(feature = "cuda")]
            mapped,
            table,
        })
    }

    /// The table itself (host memory).
    pub fn tensor(&self) -> &Tensor {
        &self.table
    }

    /// Whether the device reads the table in place (no host copy per lookup).
    pub fn mapped(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.mapped.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Rows `ids` (`[n]`, u32) of the table as `[n, hidden]` on `device`.
    pub fn rows(&self, ids: &Tensor, device: &Device) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Some(m), Device::Cuda(dev)) = (&self.mapped, device) {
            if ids.device().same_device(device) && ids.dtype() == DType::U32 {
                return m.gather(&self.table, ids, dev);
            }
        }
        let ids = ids.to_device(&Device::Cpu)?;
        self.table.index_select(&ids, 0)?.to_device(device)
    }
}

/// Rows `ids` (`[n]`, u32, on the table's device) of a `[vocab, hidden]` table held on a CUDA
/// device (bf16 or f16, contiguous) as `[n, hidden]`, by `kernels/embed.cu`'s gather: 16-byte
/// loads and stores, a block per row, where candle's `index_select` moved one element per thread
/// (150 us for the 135M shape's 32,768 rows, some 25 us this way). `None` where that does not
/// apply (the caller uses `index_select`). An id past the table gives a row of zeros.
pub fn device_rows(table: &Tensor, ids: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = table.device() {
        let fits = ids.device().same_device(table.device()) && ids.dtype() == DType::U32 && ids.rank() == 1 && ids.is_contiguous();
        if fits && table.is_contiguous() && table.rank() == 2 && matches!(table.dtype(), DType::BF16 | DType::F16) {
            use candle_core::cuda_backend::cudarc::driver::DevicePtr;
            let (vocab, hidden) = table.dims2()?;
            let guard = table.storage_and_layout().0;
            let stream = dev.cuda_stream();
            let first = match &*guard {
                candle_core::Storage::Cuda(cs) => {
                    let (base, _read) = match table.dtype() {
                        DType::BF16 => cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream),
                        _ => cs.as_cuda_slice::<half::f16>()?.device_ptr(&stream),
                    };
                    base + 2 * table.layout().start_offset() as u64
                }
                _ => candle_core::bail!("embedding table: not on the cuda device"),
            };
            // the table stays alive (and unwritten: frozen) through the launch, which the
            // stream orders after every earlier write
            let rows = gather(dev, first, vocab, hidden, table.dtype(), ids)?;
            drop(guard);
            return Ok(Some(rows));
        }
    }
    let _ = (table, ids);
    Ok(None)
}

/// `out[i] = table[ids[i]]` for a `[vocab, hidden]` two-byte table at device address `table`.
#[cfg(feature = "cuda")]
fn gather(dev: &candle_core::CudaDevice, table: u64, vocab: usize, hidden: usize, dtype: DType, ids: &Tensor) -> Result<Tensor> {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    let n = ids.elem_count();
    let row_bytes = hidden * dtype.size_in_bytes();
    let wide = row_bytes.is_multiple_of(16) && table.is_multiple_of(16);
    let (kernel, unit) = if wide { ("embed_gather_16", 16) } else { ("embed_gather_2", 2) };
    let row_units = (row_bytes / unit) as i32;
    let func = dev.get_or_load_custom_func(kernel, "embed", KERNELS)?;
    let ids_guard = ids.storage_and_layout().0;
    let ids_slice = cuda_slice_of!(ids_guard, ids, u32);
    let (n_u, vocab_u) = (n as i64, vocab as u32);
    let cfg = LaunchConfig { grid_dim: (n.clamp(1, 65_535) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    macro_rules! go {
        ($t:ty) => {{
            // SAFETY: every one of the n rows is written by the kernel
            let out = unsafe { dev.alloc::<$t>(n * hidden)? };
            let mut b = func.builder();
            b.arg(&table).arg(&ids_slice).arg(&out).arg(&n_u).arg(&row_units).arg(&vocab_u);
            // SAFETY: argument types and order match the kernel's signature (it copies bytes);
            // the table holds `vocab` rows of `row_bytes` (ids past it read nothing), `out` n
            unsafe { b.launch(cfg) }.w()?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let storage = match dtype {
        DType::BF16 => go!(half::bf16),
        DType::F16 => go!(half::f16),
        d => candle_core::bail!("embedding table: no lookup kernel for {d:?}"),
    };
    drop(ids_guard);
    Ok(Tensor::from_storage(candle_core::Storage::Cuda(storage), (n, hidden), candle_core::op::BackpropOp::none(), false))
}

/// The table's host memory registered with the driver (page-locked, mapped), unregistered on
/// drop. The registered memory is the `HostTable`'s own tensor, which outlives this.
#[cfg(feature = "cuda")]
struct Mapped {
    host: *mut std::ffi::c_void,
    device_ptr: u64,
    ctx: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
}

// SAFETY: the pointers name memory owned by the table tensor, read-only after registration; the
// driver calls that use them may come from any thread once the context is bound.
#[cfg(feature = "cuda")]
unsafe impl Send for Mapped {}
#[cfg(feature = "cuda")]
unsafe impl Sync for Mapped {}

#[cfg(feature = "cuda")]
impl Mapped {
    fn new(table: &Tensor, dev: &candle_core::CudaDevice) -> Result<Mapped> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        use candle_core::cuda_backend::WrapErr;
        if !matches!(table.dtype(), DType::BF16 | DType::F16) {
            candle_core::bail!("embedding table: no mapped lookup for {:?}", table.dtype());
        }
        let bytes = table.elem_count() * table.dtype().size_in_bytes();
        let host = {
            let (storage, layout) = table.storage_and_layout();
            let start = layout.start_offset();
            match &*storage {
                candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => v[start..].as_ptr() as *mut std::ffi::c_void,
                candle_core::Storage::Cpu(candle_core::CpuStorage::F16(v)) => v[start..].as_ptr() as *mut std::ffi::c_void,
                _ => candle_core::bail!("embedding table: not in host memory"),
            }
        };
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread().w()?;
        // SAFETY: `host` and `bytes` span the tensor's live storage, which is never written
        // again (a frozen table) and outlives the registration (`HostTable` drops this first)
        unsafe { sys::cuMemHostRegister_v2(host, bytes, sys::CU_MEMHOSTREGISTER_DEVICEMAP) }.result().w()?;
        let mut device_ptr: sys::CUdeviceptr = 0;
        // SAFETY: `host` was just registered with DEVICEMAP
        if let Err(e) = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, host, 0) }.result() {
            // SAFETY: registered above
            let _ = unsafe { sys::cuMemHostUnregister(host) };
            return Err(e).w();
        }
        Ok(Mapped { host, device_ptr, ctx })
    }

    fn gather(&self, table: &Tensor, ids: &Tensor, dev: &candle_core::CudaDevice) -> Result<Tensor> {
        // the mapped table holds `vocab` rows of `hidden` in the host memory it registered
        let (vocab, hidden) = table.dims2()?;
        gather(dev, self.device_ptr, vocab, hidden, table.dtype(), ids)
    }
}

#[cfg(feature = "cuda")]
impl Drop for Mapped {
    fn drop(&mut self) {
        use candle_core::cuda_backend::cudarc::driver::sys;
        // a lookup still queued may read the memory: let the device finish first
        if self.ctx.bind_to_thread().is_ok() && self.ctx.synchronize().is_ok() {
            // SAFETY: registered in `new`, not yet unregistered, no longer read
            let _ = unsafe { sys::cuMemHostUnregister(self.host) };
        }
    }
}

#[cfg(feature = "cuda")]
const KERNELS: &str = include_str!(concat!(env!("OUT_DIR"), "/embed.ptx"));

/// The device table's lookup (`device_rows`) against `index_select` on the CPU, bit for bit:
/// rows of 576 bf16 (16-byte copies) and of 36 (two-byte copies), repeated and unordered ids.
pub fn check_device(device: &Device) -> Result<Vec<super::KernelCheck>> {
    let mut out = Vec::new();
    if !device.is_cuda() {
        return Ok(out);
    }
    let cpu = Device::Cpu;
    for hidden in [576usize, 36] {
        let table = Tensor::randn(0f32, 1.0, (1000, hidden), &cpu)?.to_dtype(candle_core::DType::BF16)?;
        let ids: Vec<u32> = (0..3000u32).map(|i| (i * 7919 + 13) % 1000).collect();
        let ids = Tensor::new(ids.as_slice(), &cpu)?;
        let want = table.index_select(&ids, 0)?;
        let Some(got) = device_rows(&table.to_device(device)?, &ids.to_device(device)?)? else {
            candle_core::bail!("embedding lookup: no kernel took a device table");
        };
        out.push(super::KernelCheck::relative("embedding rows from a device table", format!("BF16 rows of {hidden}"), (0, hidden), &want, &got, 0.0)?);
    }
    Ok(out)
}
