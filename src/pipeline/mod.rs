//! From a volume to labels: the sliding window over the nnU-Net network, the ROI rule, and the
//! interactive session that refines per click.

pub mod image_session;
pub mod predictor;
pub mod preprocess;
pub mod resample;
pub mod robot;
pub mod roi;
pub mod session;
pub mod sliding_window;
