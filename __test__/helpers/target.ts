// The bundled target's launcher and control client live in the product; tests use them as is.
export * from '../../ts/bundled-target.js';
