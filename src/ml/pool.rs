//! The CUDA allocator's memory pool. candle allocates stream-ordered (`cuMemAllocAsync`) from the
//! device's default pool, whose release threshold is 0: at every synchronisation (a training step
//! reads its loss, a prediction its probabilities) the pool hands all freed memory back to the
//! driver, and the next step maps it again, allocation by allocation. `retain` keeps freed memory
//! in the pool instead (as PyTorch's caching allocator does); `trim` hands it back, for when a
//! job is done, `settle` after a model is loaded. All do nothing on the CPU.

use candle_core::{Device, Result};

/// Keep freed memory in `device`'s pool for reuse.
pub fn retain(device: &Device) -> Result<()> {
    set_threshold(device, u64::MAX)
}

/// Stop cudarc recording a CUDA event at each allocation and use of a buffer (it does so once
/// a context has a stream of its own, as candle's device has, to order uses across streams):
/// every kernel, copy and free of Arbiter's runs on the device's one stream, in order, so
/// those events order nothing. The one exception, the copies of activations parked in host
/// memory (`offload`), runs on a stream of its own ordered by events recorded for it.
/// `ARBITER_CUDA_EVENT_TRACKING=1` keeps them (to compare).
pub fn single_stream(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        if std::env::var("ARBITER_CUDA_EVENT_TRACKING").as_deref() != Ok("1") {
            // SAFETY: all work on this device goes to the one stream candle created for it
            // (kernels, cuBLAS, copies, stream-ordered frees), so stream order alone orders it;
            // `offload`'s copy stream waits for and is waited on through events of its own
            unsafe { d.cuda_stream().context().disable_event_tracking() };
        }
    }
    let _ = device;
}

/// Hand the pool's unused memory back to the driver (what live tensors hold stays).
pub fn trim(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = default_pool(device)? {
        use candle_core::cuda_backend::cudarc::driver::sys;
        use candle_core::cuda_backend::WrapErr;
        // SAFETY: a valid pool handle from the driver
        unsafe { sys::cuMemPoolTrimTo(pool, 0) }.result().w()?;
    }
    let _ = device;
    Ok(())
}

/// After loading weights: wait for the device, then `trim`, so the pool does not keep the
/// memory of the load's staging tensors (f32 draws, dense weights before quantizing) reserved.
pub fn settle(device: &Device) -> Result<()> {
    device.synchronize()?;
    trim(device)
}

/// The most memory the pool's allocations held at once (what live tensors take, without the
/// pool's unused reserve: the counterpart of PyTorch's `max_memory_allocated`) since the last
/// `reset_peak`; `None` on the CPU.
pub fn peak_in_use(device: &Device) -> Result<Option<u64>> {
    attribute(device, Attribute::UsedHigh, None)
}

/// Memory the device's captured forwards (CUDA graphs) reserve for their own allocations,
/// which come from a pool of their own, outside `peak_in_use`; `None` on the CPU.
pub fn graph_reserved(device: &Device) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        use candle_core::cuda_backend::WrapErr;
        let ctx = d.cuda_stream().context().clone();
        ctx.bind_to_thread().w()?;
        let mut v = 0u64;
        let attr = sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT;
        // SAFETY: a valid device handle; the attribute is a u64 the driver writes
        unsafe { sys::cuDeviceGetGraphMemAttribute(ctx.cu_device(), attr, (&mut v as *mut u64).cast()) }.result().w()?;
        return Ok(Some(v));
    }
    let _ = device;
    Ok(None)
}

/// What the pool's allocations hold now; `None` on the CPU.
pub fn in_use(device: &Device) -> Result<Option<u64>> {
    attribute(device, Attribute::Used, None)
}

/// Logs `in_use` and `peak_in_use` at a point of a training step (`what`, `layer`), at trace
/// level under the target `arbiter::memory`: where the step's peak falls is between the last
/// point below it and the first at it. With `CUDA_LAUNCH_BLOCKING=1` the figures are the
/// device's at that point (otherwise those of the work queued so far).
pub fn trace(device: &Device, what: &str, layer: usize) {
    if tracing::enabled!(target: "arbiter::memory", tracing::Level::TRACE) {
        if let (Ok(Some(in_use)), Ok(Some(peak))) = (in_use(device), peak_in_use(device)) {
            tracing::trace!(target: "arbiter::memory", what, layer, in_use, peak);
        }
    }
}

/// Restart `peak_in_use` from what is in use now (the high watermark is reset by setting it
/// to zero).
pub fn reset_peak(device: &Device) -> Result<()> {
    attribute(device, Attribute::UsedHigh, Some(0)).map(drop)
}

fn set_threshold(device: &Device, bytes: u64) -> Result<()> {
    attribute(device, Attribute::ReleaseThreshold, Some(bytes)).map(drop)
}

/// The pool attributes used here, all u64.
#[derive(Clone, Copy)]
enum Attribute {
    ReleaseThreshold,
    Used,
    UsedHigh,
}

/// Sets the default pool's attribute `which` to `value` when given, else reads it; `None` on
/// the CPU.
fn attribute(device: &Device, which: Attribute, value: Option<u64>) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = default_pool(device)? {
        use candle_core::cuda_backend::cudarc::driver::sys;
        use candle_core::cuda_backend::WrapErr;
        let attr = match which {
            Attribute::ReleaseThreshold => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            Attribute::Used => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            Attribute::UsedHigh => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        };
        let mut v = value.unwrap_or(0);
        let ptr = (&mut v as *mut u64).cast();
        // SAFETY: a valid pool handle; both attributes are u64, read or written through the pointer
        match value {
            Some(_) => unsafe { sys::cuMemPoolSetAttribute(pool, attr, ptr) },
            None => unsafe { sys::cuMemPoolGetAttribute(pool, attr, ptr) },
        }
        .result()
        .w()?;
        return Ok(Some(v));
    }
    let _ = (device, which, value);
    Ok(None)
}

#[cfg(feature = "cuda")]
fn default_pool(device: &Device) -> Result<Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool>> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::WrapErr;
    let Device::Cuda(d) = device else { return Ok(None) };
    let stream = d.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().w()?;
    let mut pool = std::ptr::null_mut();
    // SAFETY: a valid device handle from the context; the driver writes the pool handle
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result().w()?;
    Ok(Some(pool))
}
