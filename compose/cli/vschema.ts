/**
 * `mg vschema apply|show|backfill|externalize`. apply and show go through the
 * admin API, so the CLI and the route validate and publish the same way; a
 * lookup vindex added to a table with rows is backfilled by the materializer
 * while it is write_only, then externalized (decision 0059).
 */
import fs from 'node:fs';
import YAML from 'yaml';
import { callMaterializer } from '../materializer.ts';
import { callOrchestrator } from '../orchestrators.ts';
import { SpecError, type ClusterSpec } from '../spec.ts';
import { fail, followRun } from './follow.ts';

export type VSchemaCommand = 'apply' | 'show' | 'backfill' | 'externalize';

/** Prints the outcome; returns the exit code (0 done, 1 refused or failed; a bad file throws SpecError, exit 2). */
export async function runVSchemaCommand(spec: ClusterSpec, command: VSchemaCommand, database: string, arg: string | undefined): Promise<number> {
  const route = `/v1/databases/${encodeURIComponent(database)}/vschema`;
  switch (command) {
    case 'show': {
      const r = await callOrchestrator(spec, 'GET', route);
      if (r.status !== 200) return fail(r);
      console.log(`# version ${r.body.version}\n${YAML.stringify(r.body.vschema)}`);
      return 0;
    }
    case 'apply': {
      let raw: unknown;
      try {
        raw = YAML.parse(fs.readFileSync(arg!, 'utf8'));
      } catch (err) {
        throw new SpecError(`cannot read VSchema ${arg}: ${(err as Error).message}`);
      }
      return publish(spec, database, raw ?? {}, arg!);
    }
    case 'backfill': {
      const path = `/v1/databases/${encodeURIComponent(database)}/vindexes/${encodeURIComponent(arg!)}/backfill`;
      const r = await callMaterializer(spec, 'POST', path);
      if (r.status !== 202) return fail(r);
      return followRun(() => callMaterializer(spec, 'GET', path));
    }
    case 'externalize': {
      // The VSchema as it is, without the vindex's write_only: from its version on, reads route by it.
      const r = await callOrchestrator(spec, 'GET', route);
      if (r.status !== 200) return fail(r);
      const vindex = r.body.vschema.vindexes?.[arg!];
      if (!vindex?.params) {
        console.error(`mg: the VSchema of ${database} (version ${r.body.version}) has no lookup vindex ${arg}`);
        return 1;
      }
      if (!vindex.params.write_only) {
        console.log(`lookup vindex ${arg} of ${database} is not write_only: reads route by it already (version ${r.body.version})`);
        return 0;
      }
      delete vindex.params.write_only;
      return publish(spec, database, r.body.vschema, `the VSchema of ${database} without write_only on ${arg}`);
    }
  }
}

/** PUT of a VSchema; its faults, one a line, as a SpecError naming `what`. */
async function publish(spec: ClusterSpec, database: string, vschema: unknown, what: string): Promise<number> {
  const r = await callOrchestrator(spec, 'PUT', `/v1/databases/${encodeURIComponent(database)}/vschema`, vschema);
  if (r.status === 400) {
    const faults: Array<{ field: string; message: string }> = r.body.fields ?? [{ field: 'body', message: r.body.error }];
    throw new SpecError(`invalid VSchema ${what}:\n${faults.map((f) => `${f.field}: ${f.message}`).join('\n')}`);
  }
  if (r.status !== 200) return fail(r);
  console.log(`vschema of ${database}: version ${r.body.version} published`);
  return 0;
}
