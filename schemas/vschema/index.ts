/** The sharding contract: the VSchema format and the vindex functions. */
export * from './vschema.ts';
export * from './vindex.ts';
