//! The CPU engine against the contract's independent reading
//! (tests/fixtures/contract/tis-head-contract-v1.safetensors, copied from shared/fixtures):
//! every case's ROI, click count and refined logits within relative L2 error 1e-5.

mod common;

use common::{assert_parity, clicks, read_fixture, roi, tokens_to_volume};
use tis::CpuBackend;
use tis::backend::Backend;
use tis::model::TisConfig;
use tis::model::bundle::TensorFile;
use tis::model::tis_head::TisHead;
use tis::pipeline::session::refine_region;

#[test]
fn contract_fixture_cases_match() {
    let bytes = read_fixture("contract/tis-head-contract-v1.safetensors");
    let file = TensorFile::parse(&bytes, "contract fixture").unwrap();
    let config = TisConfig::from_json(file.required_metadata("tis_config").unwrap()).unwrap();
    let (_, out_proj) = file.dtype_and_shape("tis.out_proj.weight").unwrap();
    let (_, input_proj) = file.dtype_and_shape("tis.input_proj.weight").unwrap();
    let (classes, channels) = (out_proj[0], input_proj[1]);
    let backend = CpuBackend;
    let head =
        TisHead::from_tensors(&backend, &config, channels, classes, &mut |n| file.f32(n)).unwrap();
    let mut cases = 0;
    while file.dtype_and_shape(&format!("case{cases}.logits")).is_ok() {
        let c = format!("case{cases}");
        let features = file.f32(&format!("{c}.features")).unwrap();
        let probs = file.f32(&format!("{c}.probs")).unwrap();
        let out = refine_region(
            &backend,
            &head,
            &features,
            &probs,
            &clicks(&file, &format!("{c}.clicks")),
        )
        .unwrap();
        assert_eq!(out.roi, roi(&file, &format!("{c}.roi")), "{c}: ROI");
        let (_, used) = file.i64(&format!("{c}.clicks_used")).unwrap();
        assert_eq!(out.clicks_used as i64, used[0], "{c}: clicks used");
        let logits = tokens_to_volume(&backend.download(&out.logits).unwrap(), &out.roi);
        let err = assert_parity(&c, &logits, &file.f32(&format!("{c}.logits")).unwrap());
        println!(
            "{c}: ROI {:?}, {} clicks used, relative L2 error {err:e}",
            out.roi, out.clicks_used
        );
        cases += 1;
    }
    assert_eq!(cases, 3, "the contract fixture holds three cases");
}
