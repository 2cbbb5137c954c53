//! The session API: encode once, refine per click, undo, reset; errors leave it as it was.

mod common;

use common::read_fixture;
use tis::backend::Backend;
use tis::model::Bundle;
use tis::model::bundle::TensorFile;
use tis::pipeline::session::refine_region;
use tis::{Click, CpuBackend, Label, Model, Region, Session, SessionOptions};

fn iso_model() -> Model<CpuBackend> {
    Model::from_bundle(
        Bundle::from_bytes(&read_fixture("iso/bundle.safetensors"), "iso").unwrap(),
        CpuBackend,
    )
    .unwrap()
}

fn window0() -> tis::Tensor {
    let bytes = read_fixture("iso/golden.safetensors");
    TensorFile::parse(&bytes, "golden")
        .unwrap()
        .f32("window0.input")
        .unwrap()
}

/// A session over window0 with the default options.
fn iso_session(model: &Model<CpuBackend>) -> Session<'_, CpuBackend> {
    Session::new(
        model,
        &window0(),
        &SessionOptions::default(),
        &mut |_, _| {},
    )
    .unwrap()
}

fn index(grid: [usize; 3], [z, y, x]: [usize; 3]) -> usize {
    (z * grid[1] + y) * grid[2] + x
}

/// Every voxel whose label differs, as a box.
fn diff_box(grid: [usize; 3], a: &[Label], b: &[Label]) -> Option<Region> {
    let mut lo = [usize::MAX; 3];
    let mut hi = [0; 3];
    for z in 0..grid[0] {
        for y in 0..grid[1] {
            for x in 0..grid[2] {
                if a[index(grid, [z, y, x])] != b[index(grid, [z, y, x])] {
                    for (i, p) in [z, y, x].into_iter().enumerate() {
                        lo[i] = lo[i].min(p);
                        hi[i] = hi[i].max(p);
                    }
                }
            }
        }
    }
    (lo[0] != usize::MAX).then(|| Region {
        start: lo,
        size: [0, 1, 2].map(|i| hi[i] + 1 - lo[i]),
    })
}

#[test]
fn zero_clicks_give_the_automatic_segmentation() {
    let model = iso_model();
    let session = iso_session(&model);
    let bytes = read_fixture("iso/golden.safetensors");
    let golden = TensorFile::parse(&bytes, "golden").unwrap();
    let reference = model
        .backend
        .argmax_channels(&golden.f32("window0.logits").unwrap())
        .unwrap();
    assert_eq!(session.labels(), session.auto_labels());
    let agree = reference
        .iter()
        .zip(session.labels())
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        agree as f64 >= 0.999 * reference.len() as f64,
        "{agree} of {} agree",
        reference.len()
    );
    assert!(session.clicks().is_empty());
}

#[test]
fn refine_undo_reset() {
    let model = iso_model();
    let mut session = iso_session(&model);
    let grid = session.grid();
    let auto = session.auto_labels().to_vec();

    // A click that contradicts the automatic label.
    let at = [10, 18, 13];
    let wrong = 1 - auto[index(grid, at)] as usize;
    let first = [Click::new(at[0], at[1], at[2], wrong)];
    let (after_first, roi) = {
        let r = session.refine(&first).unwrap();
        assert_eq!(r.clicks_used, 1);
        assert_eq!(r.clicks_outside_roi, 0);
        assert!(
            r.changed.is_some(),
            "the refinement changed nothing: the test would prove little"
        );
        assert_eq!(r.changed, diff_box(grid, &auto, r.labels), "changed box");
        (r.labels.to_vec(), r.roi)
    };
    // Outside the ROI the automatic segmentation stands; inside, the head's argmax.
    let head = model.head.as_ref().unwrap();
    let expected = refine_region(
        &model.backend,
        head,
        session.features(),
        session.probabilities(),
        &first,
    )
    .unwrap();
    let roi_labels = model.backend.argmax_rows(&expected.logits).unwrap();
    for z in 0..grid[0] {
        for y in 0..grid[1] {
            for x in 0..grid[2] {
                let v = index(grid, [z, y, x]);
                let want = if roi.contains([z, y, x]) {
                    let r = [z - roi.start[0], y - roi.start[1], x - roi.start[2]];
                    roi_labels[(r[0] * roi.size[1] + r[1]) * roi.size[2] + r[2]]
                } else {
                    auto[v]
                };
                assert_eq!(after_first[v], want, "voxel {z} {y} {x}");
            }
        }
    }

    // A second step of two clicks, one of them a negative click.
    let second = [Click::new(4, 30, 5, 1), Click::new(15, 5, 20, 0)];
    let after_second = {
        let r = session.refine(&second).unwrap();
        assert_eq!(r.clicks_used + r.clicks_outside_roi, 3);
        assert!(r.changed.is_some());
        assert_eq!(r.changed, diff_box(grid, &after_first, r.labels));
        r.labels.to_vec()
    };
    assert_eq!(session.clicks().len(), 3);

    // Undo returns to the first step exactly, then to the automatic segmentation.
    let changed = session.undo().unwrap();
    assert_eq!(session.labels(), after_first);
    assert_eq!(changed, diff_box(grid, &after_second, &after_first));
    assert_eq!(session.clicks(), first);
    session.undo().unwrap();
    assert_eq!(session.labels(), auto);
    assert!(session.undo().is_err(), "nothing left to undo");

    // Reset from a refined state.
    session.refine(&second).unwrap();
    let refined = session.labels().to_vec();
    let changed = session.reset();
    assert_eq!(session.labels(), auto);
    assert_eq!(changed, diff_box(grid, &refined, &auto));
    assert!(session.clicks().is_empty());
}

#[test]
fn bad_clicks_leave_the_session_as_it_was() {
    let model = iso_model();
    let mut session = iso_session(&model);
    session.refine(&[Click::new(10, 18, 13, 1)]).unwrap();
    let labels = session.labels().to_vec();
    for bad in [
        vec![Click::new(21, 0, 0, 1)],
        vec![Click::new(0, 37, 0, 1)],
        vec![Click::new(5, 5, 5, 1), Click::new(0, 0, 27, 0)],
        vec![Click::new(5, 5, 5, 2)],
        vec![],
    ] {
        let err = session.refine(&bad).expect_err("a bad click was accepted");
        assert!(matches!(err, tis::Error::Click(_)), "{err}");
        assert_eq!(session.labels(), labels);
        assert_eq!(session.clicks().len(), 1);
    }
    assert!(
        session
            .refine(&[Click::new(21, 0, 0, 1)])
            .unwrap_err()
            .to_string()
            .contains("(z 21, y 0, x 0)")
    );
}

#[test]
fn network_only_model_cannot_refine() {
    let mut file = common::EditableFile::parse(&read_fixture("iso/bundle.safetensors"));
    file.metadata.remove("tis_config");
    file.tensors.retain(|t| !t.0.starts_with("tis."));
    let model = Model::from_bundle(
        Bundle::from_bytes(&file.serialize(), "net-only").unwrap(),
        CpuBackend,
    )
    .unwrap();
    let mut session = Session::new(
        &model,
        &window0(),
        &SessionOptions {
            mirror: false,
            ..Default::default()
        },
        &mut |_, _| {},
    )
    .unwrap();
    let err = session
        .refine(&[Click::new(1, 1, 1, 1)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no TIS head"), "{err}");
}

#[test]
fn volume_with_wrong_channels_is_refused() {
    let model = iso_model();
    let two_channels = tis::Tensor::zeros(&[2, 20, 20, 20]);
    let err = Session::new(
        &model,
        &two_channels,
        &SessionOptions::default(),
        &mut |_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("1 channel") && err.contains("[2, 20, 20, 20]"),
        "{err}"
    );
}
