#!/usr/bin/env node
import { helperMain } from "./mount-helper";

/** mount.fuse.addcow: the helper mount(8) runs for `-t fuse.addcow` (see mount-helper.ts). */
if (require.main === module) helperMain("mount.fuse.addcow", process.argv.slice(2));
