"""VoCoPretrain: self-supervised pre-training runs (VoCo, PUMIT tokenizer, PUMIT MIM) from Slicer.

Thin Slicer module: runs are detached ``PythonSlicer -m vocoslicer pretrain ...`` child processes with their own
run directory, so they survive a Slicer restart and can be reattached, stopped and resumed from here.
"""

import sys

from VoCoSlicerLib.compat import unsupported_message

if unsupported_message(sys.version_info):  # older Slicer: this message, not an error from newer code below
    raise ImportError(unsupported_message(sys.version_info))

import logging
import pathlib
from typing import Annotated

import ctk
import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from VoCoSlicerLib import batch_view, engine, module_support, panels, plots
from VoCoSlicerLib.job_driver import JobDriver
from VoCoSlicerLib.job_runs import list_runs, new_run_dir
from VoCoSlicerLib.params import MODEL_SIZES, PRETRAIN_METHODS, PretrainParams, from_parameter_node
from VoCoSlicerLib.state import JobState

PARAMETERS_SET_BY_CODE = ("dataDirs", "modelSize")  # dataDirsListWidget; modelSizeComboBox lists per method
DOCS = "https://github.com/vocoslicer/VoCoSlicer#readme"


class VoCoPretrain(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VoCo Pretrain")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["VoCoSlicer"]
        self.parent.contributors = ["VoCoSlicer contributors"]
        self.parent.helpText = _("Self-supervised pre-training on your own unlabelled CT folders: VoCo volume "
                                 "contrast, PUMIT tokenizer or PUMIT masked image modelling, on one or several GPUs. "
                                 "Runs continue in the background and can be reattached after a restart.") + \
            f' <a href="{DOCS}">' + _("Documentation") + "</a>"
        self.parent.acknowledgementText = _("VoCo (Wu et al.) and PUMIT (Luo et al.) pre-training methods.")


@parameterNodeWrapper
class VoCoPretrainParameterNode:
    """What the panel edits; mirrors VoCoSlicerLib.params.PretrainParams field by field."""

    method: Annotated[str, Choice(list(PRETRAIN_METHODS))] = "voco"
    dataDirs: list[str]
    modelSize: Annotated[str, Choice(list(MODEL_SIZES))] = "B"
    gpus: Annotated[int, WithinRange(1, 64)] = 1
    steps: Annotated[int, WithinRange(1, 10000000)] = 1000
    batchSize: Annotated[int, WithinRange(1, 1024)] = 2
    cropSize: Annotated[int, WithinRange(32, 512)] = 96
    outputDir: pathlib.Path
    initCheckpoint: pathlib.Path


class VoCoPretrainWidget(module_support.PanelPlumbing, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: settings, launch/stop/resume/reattach, live curves, throughput, log."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VoCoPretrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VoCoPretrainLogic()
        engine.set_startup_environment(slicer.util.startupEnvironment)  # for a "Python for jobs" not Slicer's own
        self.driver = JobDriver(_("Launch"), on_finished=self._onFinished)
        self.folderJob = batch_view.FolderSegment(_("Segment folder"))  # "Segment a folder": its own batch job
        self.curves = plots.LiveChart(_("Pre-training"))
        self.logView = module_support.LogFollower()
        self._tick = module_support.TimerTick(lambda text: slicer.util.errorDisplay(text, windowTitle="VoCoPretrain"))
        self.ui.logTextEdit.setMaximumBlockCount(2000)
        self._timer = qt.QTimer()
        self._timer.setInterval(500)
        self._timer.connect("timeout()", self._onTimer)
        for edit in (self.ui.outputDirPathLineEdit, self.ui.segInputDirPathLineEdit, self.ui.segOutputDirPathLineEdit):
            edit.filters = ctk.ctkPathLineEdit.Dirs
        self.observeSceneClose(slicer.mrmlScene)
        self.ui.addDataDirButton.connect("clicked(bool)", self.onAddDataDir)
        self.ui.removeDataDirButton.connect("clicked(bool)", self.onRemoveDataDir)
        self.ui.launchButton.connect("clicked(bool)", self.onLaunch)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.reattachButton.connect("clicked(bool)", self.onReattach)
        self.ui.copyTorchrunButton.connect("clicked(bool)", self.onCopyTorchrun)
        self.ui.segmentFolderButton.connect("clicked(bool)", self.onSegmentFolder)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", lambda: self.onMethodChanged(
            self.ui.methodComboBox.currentText))  # the parameter node may lag behind the widget
        self.ui.modelSizeComboBox.connect("currentIndexChanged(int)", lambda: self._parameterNode and setattr(
            self._parameterNode, "modelSize", self.ui.modelSizeComboBox.currentText or self._parameterNode.modelSize))
        self.initializeParameterNode()
        self._refreshRuns()
        self._updateGUI()

    def cleanup(self):
        self.removeObservers()
        self._timer.stop()  # the run itself is detached: it keeps going and can be reattached
        self.folderJob.driver.close()  # the folder batch is not: a rerun into the same folder resumes it

    def enter(self):
        self.initializeParameterNode()
        self._refreshRuns()

    def sceneClosing(self):
        self.curves.reset()  # its node IDs may be reused by the next scene

    def parameterNodeSet(self):
        self.ui.dataDirsListWidget.clear()
        for folder in self._parameterNode.dataDirs:
            self.ui.dataDirsListWidget.addItem(folder)
        self.onMethodChanged(self._parameterNode.method)

    def onMethodChanged(self, method):
        """Only the sizes this method accepts; "Start from" takes a folder for MIM, a file for VoCo."""
        if self._parameterNode is None:
            return
        sizes, chosen = panels.sizes_for(method, self._parameterNode.modelSize)
        combo, blocked = self.ui.modelSizeComboBox, self.ui.modelSizeComboBox.blockSignals(True)
        combo.clear()
        combo.addItems(sizes)
        combo.setCurrentText(chosen)
        combo.blockSignals(blocked)
        self._parameterNode.modelSize = chosen
        start = panels.start_from(method)
        self.ui.initCheckpointPathLineEdit.enabled = start.enabled
        self.ui.initCheckpointPathLineEdit.toolTip = start.tooltip
        self.ui.initCheckpointPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs if start.folders else \
            ctk.ctkPathLineEdit.Files

    def _params(self):
        return from_parameter_node(PretrainParams, self._parameterNode)

    def onAddDataDir(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder of unlabelled volumes"))
        if folder and folder not in self._parameterNode.dataDirs:
            self._parameterNode.dataDirs = [*self._parameterNode.dataDirs, folder]
            self.ui.dataDirsListWidget.addItem(folder)

    def onRemoveDataDir(self):
        row = self.ui.dataDirsListWidget.currentRow
        if row >= 0:
            self._parameterNode.dataDirs = [d for i, d in enumerate(self._parameterNode.dataDirs) if i != row]
            self.ui.dataDirsListWidget.takeItem(row)

    def onLaunch(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to launch pre-training."), waitCursor=True):
            params = self._params()
            self.driver.start([params.args()], run_dir=new_run_dir(f"pretrain-{params.method}"), detached=True,
                              python=module_support.job_python(qt.QSettings()))
            self._follow()

    def onStop(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to stop the run.")):
            self.driver.cancel()
            self._updateGUI()

    def _selectedRun(self):
        runDir = self.ui.runsComboBox.itemData(self.ui.runsComboBox.currentIndex)
        if not runDir:
            raise ValueError(_("Select a previous run first."))
        return runDir

    def onResume(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to resume the run."), waitCursor=True):
            self.driver.python = module_support.job_python(qt.QSettings())
            self.driver.resume(self._selectedRun(), detached=True)
            self._follow()

    def onReattach(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to reattach to the run."), waitCursor=True):
            self.driver.attach(self._selectedRun())
            self._follow()

    def onCopyTorchrun(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to build the torchrun command.")):
            command = self._params().torchrun_command()
            qt.QApplication.clipboard().setText(command)
            self.driver.log.append(f"copied: {command}")
            self._updateGUI()

    def onSegmentFolder(self):  # Start, or Cancel while it runs
        with slicer.util.tryWithErrorDisplay(_("Failed to start segmenting the folder."), waitCursor=True):
            ui = self.ui
            self.folderJob.toggle(ui.segInputDirPathLineEdit.currentPath, ui.segOutputDirPathLineEdit.currentPath,
                                  ui.segModelLineEdit.text, ui.segDeviceComboBox.currentText,
                                  python=module_support.job_python(qt.QSettings()),
                                  run_dir=lambda: new_run_dir("segment-folder"))
            self._timer.start()
            self._updateGUI()

    def _follow(self):
        slicer.modules.plots.logic().ShowChartInLayout(self.curves.follow(slicer.mrmlScene))
        self._timer.start()
        self._updateGUI()

    def _refreshRuns(self):
        self.ui.runsComboBox.clear()
        for text, runDir in panels.runs_of(list_runs(), "pretrain"):
            self.ui.runsComboBox.addItem(text, runDir)

    def _drawCurves(self):
        if self.curves.update(slicer.mrmlScene, self.driver.metrics, create=self.driver.busy):
            slicer.modules.plots.logic().ShowChartInLayout(self.curves.chart(slicer.mrmlScene))

    def _onTimer(self):  # one report per tick, no re-entry while a dialog is open (module_support.TimerTick)
        self._tick([(_("Run monitoring"), self.driver.tick), (_("Live curves"), self._drawCurves),
                    (_("Folder segmentation"), self.folderJob.tick), (_("Panel update"), self._updateGUI)])
        if not self.driver.busy and not self.folderJob.busy:
            self._timer.stop()

    def _onFinished(self, driver):
        logging.info(f"pre-training run {driver.run_dir} ended: {driver.state.state.value} {driver.state.message}")
        self._refreshRuns()

    def _updateGUI(self):
        busy = self.driver.busy
        self.ui.launchButton.enabled = not busy
        self.ui.resumeButton.enabled = not busy and self.ui.runsComboBox.count > 0
        self.ui.reattachButton.enabled = not busy and self.ui.runsComboBox.count > 0
        self.ui.stopButton.enabled = self.driver.state.state is JobState.RUNNING
        panels.show_job(panels.job_widgets(self.driver), None, self.ui.progressBar, self.ui.statusLabel)
        self.ui.statusLabel.text = self.driver.state.view().progress_text  # throughput has its own label
        self.ui.throughputLabel.text = self.driver.throughput.text()
        self.folderJob.show(self.ui.segmentFolderButton, self.ui.segProgressBar, self.ui.segStatusLabel)
        for w in (self.ui.segInputDirPathLineEdit, self.ui.segOutputDirPathLineEdit, self.ui.segModelLineEdit):
            w.enabled = not self.folderJob.busy
        self.logView.show(self.ui.logTextEdit, [("", self.driver.log), ("segment folder: ", self.folderJob.driver.log)])


class VoCoPretrainLogic(ScriptedLoadableModuleLogic):
    """Parameter node only; the run is driven by VoCoSlicerLib.job_driver."""

    def getParameterNode(self):
        return VoCoPretrainParameterNode(super().getParameterNode())


class VoCoPretrainTest(ScriptedLoadableModuleTest):
    """In-app test: a few steps of the smallest PUMIT tokenizer on phantoms, then reattach to the finished run."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_tiny_run_and_reattach()

    def _wait(self, driver, timeout=600):
        self.assertTrue(module_support.wait_for(driver, slicer.app.processEvents, timeout), "run timed out")

    def test_tiny_run_and_reattach(self):
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            self.skipTest("PyTorch is not installed (installs are skipped in testing mode)")
        tmp = pathlib.Path(slicer.util.tempDirectory())
        driver = JobDriver("test")
        driver.start([["phantom", "--seed", "11", "--count", "2", "--size", "48", "48", "24", "-o", str(tmp / "data")]])
        self._wait(driver)
        images = [str(p) for p in sorted((tmp / "data").glob("*_ct.nii.gz"))]  # not the truth label maps
        params = PretrainParams(method="tokenizer", dataDirs=images, modelSize="tiny", steps=4,
                                batchSize=1, cropSize=32, outputDir=str(tmp / "run"))
        driver.start([params.args()], run_dir=tmp / "job", detached=True)
        self._wait(driver)
        self.assertEqual(driver.state.state, JobState.DONE, driver.state.message)
        self.assertTrue(driver.metrics.names(), "the run reported no metrics")
        later = JobDriver("test")
        later.attach(tmp / "job")
        self._wait(later)
        self.assertEqual(later.state.state, JobState.DONE)
        self.delayDisplay("Test passed")
