//! Activations parked in host memory between a training block's forward and its backward.
//!
//! A block that keeps its MLP's gate and up projections holds two thirds of its activations in
//! them; recomputing them in the backward costs two of the block's seven GEMMs. Parked, they
//! cost none: on CUDA the forward copies them to page-locked host memory on a stream of their
//! own, the block's device copies are freed a few blocks later (once the copy is surely done),
//! and the backward copies them back a few blocks ahead of the block that reads them. The
//! copies run on the GPU's copy engines, beside the kernels; events order them against the
//! device's stream, which allocates, reads and frees every buffer. Host buffers are kept per
//! layer and reused by every micro-batch and step (grown for a longer one).
//!
//! Elsewhere (the CPU) a parked tensor simply stays where it is: the same schedule, no copy.

use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor};

/// The host buffers and the copy stream, shared by a training run's steps
/// (`LoraCtx::mlp_parking`).
#[derive(Default, Clone)]
pub struct Parking {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    inner: Arc<Mutex<Lot>>,
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Parking")
    }
}

#[derive(Default)]
struct Lot {
    #[cfg(feature = "cuda")]
    side: Option<cuda::Side>,
    /// Host buffers by (layer, tensor index).
    #[cfg(feature = "cuda")]
    host: std::collections::HashMap<(usize, usize), cuda::HostBuf>,
}

impl Drop for Lot {
    /// The copies through the host buffers record no event on them: the buffers are freed only
    /// once the copy stream has run dry (a run that stopped mid-step may leave copies queued).
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        if let Some(side) = &self.side {
            if let Err(e) = side.synchronize() {
                tracing::warn!(error = %e, "parking: the copy stream did not finish");
            }
        }
    }
}

/// Tensors of one layer on their way to host memory, there, or on their way back.
pub struct Parked {
    li: usize,
    state: State,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum State {
    /// Being copied out (CUDA; the device copies are freed by `release`), or kept as they are.
    Out { tensors: Vec<Tensor>, #[cfg(feature = "cuda")] copied: Option<cuda::Copy> },
    /// In host memory only.
    Host { shapes: Vec<(candle_core::Shape, candle_core::DType)>, device: candle_core::Device },
    /// Being copied back into these device buffers.
    In { tensors: Vec<Tensor>, #[cfg(feature = "cuda")] copied: Option<cuda::Copy> },
}

impl Parking {
    /// Starts parking layer `li`'s `tensors` (contiguous): on CUDA the copies to host memory
    /// are queued behind the work that makes them.
    pub fn park(&self, li: usize, tensors: Vec<Tensor>) -> Result<Parked> {
        #[cfg(feature = "cuda")]
        if let Some(candle_core::Device::Cuda(dev)) = tensors.first().map(|t| t.device()) {
            let mut lot = self.lock()?;
            let copied = cuda::park(&mut lot, dev, li, &tensors)?;
            return Ok(Parked { li, state: State::Out { tensors, copied: Some(copied) } });
        }
        Ok(Parked {
            li,
            state: State::Out {
                tensors,
                #[cfg(feature = "cuda")]
                copied: None,
            },
        })
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Lot>> {
        self.inner.lock().map_err(|_| candle_core::Error::Msg("parking: poisoned lock".into()))
    }
}

impl Parked {
    /// Frees the device copies once the copies out are done (the device's stream waits for
    /// them, the host does not). Elsewhere the tensors stay.
    pub fn release(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let State::Out { tensors, copied: Some(c) } = &self.state {
            c.wait_on_main()?;
            let shapes = tensors.iter().map(|t| (t.shape().clone(), t.dtype())).collect();
            let device = tensors.first().map(|t| t.device().clone()).unwrap_or(candle_core::Device::Cpu);
            // the device copies go here, their frees queued behind the wait
            self.state = State::Host { shapes, device };
        }
        Ok(())
    }

    /// Starts copying the tensors back into fresh device buffers, if they are only in host
    /// memory.
    pub fn fetch(&mut self, parking: &Parking) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let State::Host { shapes, device: candle_core::Device::Cuda(dev) } = &self.state {
            let mut lot = parking.lock()?;
            let (tensors, copied) = cuda::fetch(&mut lot, dev, self.li, shapes)?;
            self.state = State::In { tensors, copied: Some(copied) };
        }
        let _ = parking;
        Ok(())
    }

    /// The tensors, on their device: fetched if not yet, and the device's stream made to wait
    /// for the copies.
    pub fn take(mut self, parking: &Parking) -> Result<Vec<Tensor>> {
        self.fetch(parking)?;
        let taken = State::Host { shapes: Vec::new(), device: candle_core::Device::Cpu };
        match std::mem::replace(&mut self.state, taken) {
            #[cfg(feature = "cuda")]
            State::Out { tensors, copied } | State::In { tensors, copied } => {
                // still on the device (never released), or copied back
                if let Some(c) = copied {
                    c.wait_on_main()?;
                }
                Ok(tensors)
            }
            #[cfg(not(feature = "cuda"))]
            State::Out { tensors } | State::In { tensors } => Ok(tensors),
            State::Host { .. } => candle_core::bail!("parking: layer {} not fetched", self.li),
        }
    }
}

impl Drop for Parked {
    /// Parked tensors given up on the way (a step that failed between its forward and its
    /// backward): the device's stream waits for their copies before it frees or reuses the
    /// buffers the copies read or write.
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        if let State::Out { copied: Some(c), .. } | State::In { copied: Some(c), .. } = &self.state {
            if let Err(e) = c.wait_on_main() {
                tracing::warn!(error = %e, layer = self.li, "parking: could not order a copy before its buffer's release");
            }
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaSlice, CudaStream, CudaView, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, DType, Result, Shape, Storage, Tensor};
    use half::bf16;

    use super::Lot;

    pub struct Side {
        stream: Arc<CudaStream>,
    }

    impl Side {
        /// Waits (the host) for every copy queued on the stream.
        pub fn synchronize(&self) -> Result<()> {
            self.stream.synchronize().w()
        }
    }

    pub enum HostBuf {
        Bf16(PinnedHostSlice<bf16>),
        F32(PinnedHostSlice<f32>),
    }

    /// A copy queued on the side stream: the event recorded after it.
    pub struct Copy {
        done: CudaEvent,
        main: Arc<CudaStream>,
    }

    impl Copy {
        /// The device's stream waits for the copy (work queued on it later runs after).
        pub fn wait_on_main(&self) -> Result<()> {
            self.main.wait(&self.done).w()
        }
    }

    fn side<'a>(lot: &'a mut Lot, dev: &CudaDevice) -> Result<&'a Arc<CudaStream>> {
        if lot.side.is_none() {
            lot.side = Some(Side { stream: dev.cuda_stream().context().new_stream().w()? });
        }
        Ok(&lot.side.as_ref().expect("made above").stream)
    }

    fn host<'a>(lot: &'a mut Lot, dev: &CudaDevice, key: (usize, usize), dtype: DType, len: usize) -> Result<&'a mut HostBuf> {
        // buffers only grow: micro-batches padded to other lengths reuse the largest so far
        // (page-locking host memory takes milliseconds per hundred megabytes)
        let fits = match lot.host.get(&key) {
            Some(HostBuf::Bf16(h)) => dtype == DType::BF16 && h.len() >= len,
            Some(HostBuf::F32(h)) => dtype == DType::F32 && h.len() >= len,
            None => false,
        };
        if !fits {
            // the copies through the buffer it replaces record no event on it: let them finish
            // before it is freed
            if let (Some(side), true) = (&lot.side, lot.host.contains_key(&key)) {
                side.synchronize()?;
            }
            let ctx = dev.cuda_stream().context().clone();
            // SAFETY: the buffer is written by a copy before it is read
            let buf = match dtype {
                DType::BF16 => HostBuf::Bf16(unsafe { ctx.alloc_pinned_with_flags::<bf16>(len, 0) }.w()?),
                DType::F32 => HostBuf::F32(unsafe { ctx.alloc_pinned_with_flags::<f32>(len, 0) }.w()?),
                other => candle_core::bail!("parking: {other:?} tensors are not parked"),
            };
            lot.host.insert(key, buf);
        }
        Ok(lot.host.get_mut(&key).expect("inserted above"))
    }

    fn slice<'a, T: candle_core::cuda_backend::CudaDType + DeviceRepr>(s: &'a Storage, t: &Tensor) -> Result<CudaView<'a, T>> {
        let (o1, o2) = t.layout().contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("parking: tensor not contiguous".into()))?;
        match s {
            Storage::Cuda(c) => Ok(c.as_cuda_slice::<T>()?.slice(o1..o2)),
            _ => candle_core::bail!("parking: tensor not on the CUDA device"),
        }
    }

    pub fn park(lot: &mut Lot, dev: &CudaDevice, li: usize, tensors: &[Tensor]) -> Result<Copy> {
        let main = dev.cuda_stream();
        let side = side(lot, dev)?.clone();
        // the side stream starts after the work that makes the tensors
        side.wait(&main.record_event(None).w()?).w()?;
        for (i, t) in tensors.iter().enumerate() {
            let n = t.elem_count();
            let guard = t.storage_and_layout().0;
            // into the first n elements (a copy fills its whole host slice)
            match host(lot, dev, (li, i), t.dtype(), n)? {
                HostBuf::Bf16(h) => side.memcpy_dtoh(&slice::<bf16>(&guard, t)?, head_mut(h, n)?).w()?,
                HostBuf::F32(h) => side.memcpy_dtoh(&slice::<f32>(&guard, t)?, head_mut(h, n)?).w()?,
            }
        }
        Ok(Copy { done: side.record_event(None).w()?, main })
    }

    pub fn fetch(lot: &mut Lot, dev: &CudaDevice, li: usize, shapes: &[(Shape, DType)]) -> Result<(Vec<Tensor>, Copy)> {
        let main = dev.cuda_stream();
        let side = side(lot, dev)?.clone();
        let mut dsts = Vec::with_capacity(shapes.len());
        for (shape, dtype) in shapes {
            // SAFETY: the copy below writes every element before the device's stream reads it
            dsts.push(match dtype {
                DType::BF16 => Dst::Bf16(unsafe { dev.alloc::<bf16>(shape.elem_count())? }),
                DType::F32 => Dst::F32(unsafe { dev.alloc::<f32>(shape.elem_count())? }),
                other => candle_core::bail!("parking: {other:?} tensors are not parked"),
            });
        }
        // the buffers were allocated in the device stream's order: the copies start after that
        side.wait(&main.record_event(None).w()?).w()?;
        let mut tensors = Vec::with_capacity(shapes.len());
        for (i, (dst, (shape, _))) in dsts.into_iter().zip(shapes).enumerate() {
            let storage = match (dst, lot.host.get(&(li, i))) {
                (Dst::Bf16(mut d), Some(HostBuf::Bf16(h))) => {
                    side.memcpy_htod(head(h, d.len())?, &mut d).w()?;
                    CudaStorage::wrap_cuda_slice(d, dev.clone())
                }
                (Dst::F32(mut d), Some(HostBuf::F32(h))) => {
                    side.memcpy_htod(head(h, d.len())?, &mut d).w()?;
                    CudaStorage::wrap_cuda_slice(d, dev.clone())
                }
                _ => candle_core::bail!("parking: no host copy of layer {li}'s tensor {i}"),
            };
            tensors.push(Tensor::from_storage(Storage::Cuda(storage), shape.clone(), BackpropOp::none(), false));
        }
        Ok((tensors, Copy { done: side.record_event(None).w()?, main }))
    }

    enum Dst {
        Bf16(CudaSlice<bf16>),
        F32(CudaSlice<f32>),
    }

    /// The first `n` elements of a host buffer (one made for a longer micro-batch), to copy
    /// from: still page-locked memory, so the copy stays asynchronous. Copies through these
    /// plain slices record no event on the buffer, so taking them never makes the host wait;
    /// the side stream, the only one that touches the buffers, orders the copies.
    fn head<T: DeviceRepr + ValidAsZeroBits>(h: &PinnedHostSlice<T>, n: usize) -> Result<&[T]> {
        let all = h.as_slice().w()?;
        let len = all.len();
        all.get(..n).ok_or_else(|| candle_core::Error::Msg(format!("parking: host buffer of {len} elements for {n}")))
    }

    /// `head` to copy into.
    fn head_mut<T: DeviceRepr + ValidAsZeroBits>(h: &mut PinnedHostSlice<T>, n: usize) -> Result<&mut [T]> {
        let all = h.as_mut_slice().w()?;
        let len = all.len();
        all.get_mut(..n).ok_or_else(|| candle_core::Error::Msg(format!("parking: host buffer of {len} elements for {n}")))
    }
}

/// A round trip through host memory on `device`: tensors parked, their device copies freed,
/// the memory reused by other work, then fetched back; they must come back bit for bit.
pub fn check_device(device: &candle_core::Device) -> Result<Vec<super::KernelCheck>> {
    use candle_core::DType;
    let parking = Parking::default();
    let mut out = Vec::new();
    // the second reuses the first's larger host buffers
    for (dtype, shape) in [(DType::BF16, (33usize, 200usize)), (DType::BF16, (20, 120)), (DType::F32, (7, 64))] {
        let a = Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?;
        let b = Tensor::randn(0f32, 1.0, (shape.0, shape.1 * 2), device)?.to_dtype(dtype)?;
        let want = [a.to_device(&candle_core::Device::Cpu)?, b.to_device(&candle_core::Device::Cpu)?];
        let mut parked = parking.park(3, vec![a, b])?;
        parked.release()?;
        // work that may take the freed memory over
        let scratch = Tensor::ones((shape.0, shape.1 * 3), dtype, device)?;
        parked.fetch(&parking)?;
        let got = parked.take(&parking)?;
        drop(scratch);
        for (w, g) in want.iter().zip(&got) {
            let w = w.to_dtype(DType::F32)?;
            out.push(super::KernelCheck::relative("parked round trip", format!("{dtype:?}"), shape, &w, &g.to_dtype(DType::F32)?, 0.0)?);
        }
    }
    Ok(out)
}
