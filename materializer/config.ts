/** The materializer's configuration: one JSON file, written by `mg cluster up`. */
import { z } from 'zod';
import { readJsonConfig } from '../common/config.ts';

export const materializerConfigSchema = z.object({
  id: z.string().regex(/^[a-zA-Z0-9._-]+$/).default('materializer'),
  /** REST API (/v1/workflows) and /metrics. */
  port: z.number().int().min(0).max(65535),
  brokers: z.array(z.string()).min(1),
  registryUrl: z.string().url(),
  topicPrefix: z.string().default(''),
  /** Per database: the CDC topic prefix (the spec's databases[].cdc.topicPrefix); others use `mg`. */
  cdcTopicPrefixes: z.record(z.string()).default({}),
  /** Rows per copy page (one event each: the unit a restart resumes from). */
  pageRows: z.number().int().min(1).max(1_000_000).default(5_000),
  /** Source rows per VDiff range. */
  vdiffRows: z.number().int().min(1).max(1_000_000).default(10_000),
  /** An online migration's revert window when its submit names none: how long the old table is kept in step (decision 0060). */
  migrationRevertSeconds: z.number().int().min(0).default(86_400),
}).strict();

export type MaterializerConfig = z.infer<typeof materializerConfigSchema>;

export const readMaterializerConfig = (file: string) => readJsonConfig(file, materializerConfigSchema, 'materializer');
