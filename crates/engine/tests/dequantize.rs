//! Affine dequantization at every bit width mlx writes (2, 3, 4, 5, 6, 8) and several group
//! sizes matches `mx.dequantize` (tests/fixtures/mlx-affine-dequant, from tools/make_fixtures.py).

use std::path::Path;

use flash_moe_engine::storage::checkpoint::Checkpoint;
use flash_moe_engine::storage::quant::{MatrixView, floats_to_vec};

#[test]
fn matches_mlx_at_every_width_and_group_size() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mlx-affine-dequant");
    let table = Checkpoint::open(&dir).unwrap();
    let mut checked = 0;
    for bits in [2u32, 3, 4, 5, 6, 8] {
        for group in [32usize, 64, 128] {
            let key = format!("b{bits}_g{group}");
            let get = |suffix: &str| table.require(&format!("{key}.{suffix}")).unwrap();
            let (weight, scales, biases, expected) = (get("weight"), get("scales"), get("biases"), get("dequantized"));
            let (rows, cols) = (expected.shape[0], expected.shape[1]);
            let matrix = MatrixView::affine(
                &key,
                rows,
                cols,
                bits,
                group,
                scales.dtype().unwrap(),
                weight.data.clone(),
                scales.data.clone(),
                biases.data.clone(),
            )
            .unwrap();
            let expected = floats_to_vec(expected.data.bytes(), expected.dtype().unwrap());
            let mut row = vec![0.0f32; cols];
            for r in 0..rows {
                matrix.dequantize_row(r, &mut row);
                for (c, (&ours, &theirs)) in row.iter().zip(&expected[r * cols..(r + 1) * cols]).enumerate() {
                    assert!(
                        (ours - theirs).abs() <= 1e-6 * theirs.abs().max(1.0),
                        "{key} row {r} col {c}: {ours} vs mlx {theirs}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 18);
}

/// Our quantizer gives the codes, scales and biases `mx.quantize` gave for the same f32
/// matrix, bit for bit.
#[test]
fn quantizer_matches_mx_quantize_bit_for_bit() {
    use flash_moe_engine::storage::checkpoint::DType;
    use flash_moe_engine::storage::quantize::quantize_affine;

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mlx-affine-dequant");
    let table = Checkpoint::open(&dir).unwrap();
    let source = table.require("source").unwrap();
    let values = floats_to_vec(source.data.bytes(), source.dtype().unwrap());
    let cols = source.shape[1];
    for bits in [2u32, 3, 4, 5, 6, 8] {
        for group in [32usize, 64, 128] {
            let key = format!("b{bits}_g{group}");
            let q = quantize_affine(&values, cols, bits, group, DType::F32);
            let expect = |suffix: &str| table.require(&format!("{key}.{suffix}")).unwrap().data.bytes().to_vec();
            assert_eq!(q.scales, expect("scales"), "{key} scales");
            assert_eq!(q.biases, expect("biases"), "{key} biases");
            assert_eq!(q.codes, expect("weight"), "{key} codes");
        }
    }
}
