//! Voxel-grid geometry shared by the pipeline and the backends: axis-aligned regions and clicks.
//! Coordinates are voxel indices on the grid in (z, y, x) order, x fastest (C order).

use crate::error::{Error, Result};

/// A label value of a segmentation (class index, background 0).
pub type Label = u16;

/// An axis-aligned box of voxels: `start` inclusive, `start + size` exclusive, per axis (z, y, x).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    pub start: [usize; 3],
    pub size: [usize; 3],
}

impl Region {
    /// The whole grid of `shape`.
    pub fn full(shape: [usize; 3]) -> Self {
        Region {
            start: [0; 3],
            size: shape,
        }
    }

    pub fn stop(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| self.start[a] + self.size[a])
    }

    pub fn voxels(&self) -> usize {
        self.size.iter().product()
    }

    pub fn contains(&self, p: [usize; 3]) -> bool {
        (0..3).all(|a| p[a] >= self.start[a] && p[a] < self.start[a] + self.size[a])
    }

    /// The smallest region holding both.
    pub fn union(&self, other: &Region) -> Region {
        let start = [0, 1, 2].map(|a| self.start[a].min(other.start[a]));
        let stop = [0, 1, 2].map(|a| self.stop()[a].max(other.stop()[a]));
        Region {
            start,
            size: [0, 1, 2].map(|a| stop[a] - start[a]),
        }
    }

    /// Fails unless the region lies inside a grid of `shape`.
    pub fn check_inside(&self, shape: [usize; 3]) -> Result<()> {
        if (0..3).any(|a| self.size[a] == 0 || self.stop()[a] > shape[a]) {
            return Err(Error::Shape(format!(
                "region start {:?} size {:?} does not fit grid {:?}",
                self.start, self.size, shape
            )));
        }
        Ok(())
    }
}

/// A user click: a voxel and the class the user names for it (0 = background, a negative click).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Click {
    pub z: usize,
    pub y: usize,
    pub x: usize,
    pub class: usize,
}

impl Click {
    pub fn new(z: usize, y: usize, x: usize, class: usize) -> Self {
        Click { z, y, x, class }
    }

    pub fn position(&self) -> [usize; 3] {
        [self.z, self.y, self.x]
    }

    /// Fails, naming the click, unless it lies on a grid of `shape` and names one of `classes`.
    pub fn check(&self, shape: [usize; 3], classes: usize) -> Result<()> {
        if !Region::full(shape).contains(self.position()) {
            return Err(Error::Click(format!(
                "click (z {}, y {}, x {}) lies outside the grid of {} × {} × {} voxels",
                self.z, self.y, self.x, shape[0], shape[1], shape[2]
            )));
        }
        if self.class >= classes {
            return Err(Error::Click(format!(
                "click (z {}, y {}, x {}) names class {}, but the model has classes 0..{}",
                self.z,
                self.y,
                self.x,
                self.class,
                classes - 1
            )));
        }
        Ok(())
    }
}
