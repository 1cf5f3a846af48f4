//! The `/predict` and `/v1/predict` body decoder on arbitrary bytes, then the limit checks on
//! what decodes: no panic, and an accepted body is within the limits.
#![no_main]

use arbiter::http::predict::{decode_predict_body, native_rows, tei_rows, PredictBody, PredictLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = PredictLimits { max_pairs: 8, max_length: 512, max_file_rows: 16, max_text_chars: 256, default_adapter: None };
    match decode_predict_body(data) {
        Ok(PredictBody::Native(mut body)) => {
            if let Ok((ids, rows)) = native_rows(&mut body, &limits) {
                assert_eq!(ids.len(), rows.len());
                assert!(rows.len() <= limits.max_pairs);
            }
        }
        Ok(PredictBody::Tei(mut body)) => {
            if let Ok((rows, single)) = tei_rows(&mut body, &limits) {
                assert!(rows.len() <= limits.max_pairs && (!single || rows.len() == 1));
            }
        }
        Err(e) => assert!(e.status.is_client_error(), "{e}"),
    }
});
